package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"

	"github.com/containernetworking/cni/libcni"

	"github.com/ambitmesh/ambit/cni"
)

// This file is the pure core: config bytes in, config bytes out. The
// primary CNI's file is edited as ordered JSON (object keys in their order,
// every value other than Ambit's entry kept byte for byte, unknown fields
// and all), so that what goes back is what was there, plus or minus one
// entry; only the whitespace is normalized, to two-space indentation.

// entry is Ambit's entry as Install writes it.
type entry struct {
	Type string `json:"type"`
	cni.PluginConfig
	// ConvertedFrom names the single-plugin config file (.conf or .json)
	// that Install turned into this conflist, so that Uninstall can put it
	// back. The plugin ignores it.
	ConvertedFrom string `json:"converted_from,omitempty"`
}

func (e entry) marshal() json.RawMessage {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	// An entry of strings, ints and a string slice always encodes.
	_ = enc.Encode(e)
	return bytes.TrimSpace(b.Bytes())
}

// member is one key of a JSON object with its value as written.
type member struct {
	key   string
	value json.RawMessage
}

// object is a JSON object that keeps its keys' order and its values' bytes.
type object []member

func parseObject(data []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil {
		return nil, err
	} else if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var o object
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string) // inside an object, the decoder only returns string keys
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("value of %q: %w", key, err)
		}
		o = append(o, member{key, v})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return o, nil
}

// get returns the value of key. With duplicate keys the last one counts, as
// for encoding/json and so for libcni.
func (o object) get(key string) (json.RawMessage, bool) {
	for i := len(o) - 1; i >= 0; i-- {
		if o[i].key == key {
			return o[i].value, true
		}
	}
	return nil, false
}

// set replaces the value of key where it is, or appends key.
func (o object) set(key string, v json.RawMessage) object {
	for i := len(o) - 1; i >= 0; i-- {
		if o[i].key == key {
			o[i].value = v
			return o
		}
	}
	return append(o, member{key, v})
}

func (o object) marshal() []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		_ = enc.Encode(m.key) // a string always encodes; Encode adds a newline, which is whitespace
		b.WriteByte(':')
		b.Write(m.value)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// pretty indents JSON by two spaces and ends it with a newline.
func pretty(data []byte) ([]byte, error) {
	var b bytes.Buffer
	if err := json.Indent(&b, data, "", "  "); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

func compactEqual(a, b []byte) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

func marshalPlugins(ps []json.RawMessage) json.RawMessage {
	b := []byte{'['}
	for i, p := range ps {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, p...)
	}
	return append(b, ']')
}

// plugin is what the core reads of a plugin entry.
type plugin struct {
	Type          string `json:"type"`
	ConvertedFrom string `json:"converted_from"`
}

func readPlugin(raw json.RawMessage) plugin {
	var p plugin
	_ = json.Unmarshal(raw, &p) // an entry that is not an object is not Ambit's
	return p
}

// conflist is a parsed conflist: the object and its plugins.
type conflist struct {
	obj     object
	plugins []json.RawMessage
}

func parseConflist(data []byte) (*conflist, error) {
	obj, err := parseObject(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	raw, ok := obj.get("plugins")
	if !ok {
		return nil, fmt.Errorf("%w: no \"plugins\" list", ErrInvalidConfig)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, fmt.Errorf("%w: \"plugins\": %w", ErrInvalidConfig, err)
	}
	return &conflist{obj: obj, plugins: plugins}, nil
}

func (l *conflist) marshal(plugins []json.RawMessage) ([]byte, error) {
	return pretty(l.obj.set("plugins", marshalPlugins(plugins)).marshal())
}

// withEntry returns conflist data with Ambit's entry for pc. An entry that
// is already there is updated where it is, so that a chained plugin someone
// appended after Ambit's stays after it (two installers each insisting on
// the last place would rewrite the file forever), unless no other plugin
// precedes it, where it could never work; then it moves to the end. Extra
// Ambit entries are dropped. changed is false, and out is data itself, when
// the entry is already as wanted.
func withEntry(data []byte, pc cni.PluginConfig) (out []byte, changed bool, err error) {
	l, err := parseConflist(data)
	if err != nil {
		return nil, false, err
	}
	var ours []int
	for i, p := range l.plugins {
		if readPlugin(p).Type == cni.PluginType {
			ours = append(ours, i)
		}
	}
	if len(ours) == len(l.plugins) {
		return nil, false, fmt.Errorf("%w: no plugin for %s to chain after", ErrInvalidConfig, cni.PluginType)
	}
	e := entry{Type: cni.PluginType, PluginConfig: pc}
	if len(ours) > 0 {
		e.ConvertedFrom = readPlugin(l.plugins[ours[0]]).ConvertedFrom
	}
	want := e.marshal()
	if len(ours) == 1 && ours[0] > 0 && compactEqual(l.plugins[ours[0]], want) {
		return data, false, nil
	}
	var plugins []json.RawMessage
	placed := false
	for _, p := range l.plugins {
		switch {
		case readPlugin(p).Type != cni.PluginType:
			plugins = append(plugins, p)
		case !placed && len(plugins) > 0:
			plugins = append(plugins, want)
			placed = true
		}
	}
	if !placed {
		plugins = append(plugins, want)
	}
	out, err = l.marshal(plugins)
	return out, err == nil, err
}

// converted returns the conflist that replaces the single-plugin config
// data, read from the file called name: that plugin, byte for byte, then
// Ambit's entry, under the config's own name and cniVersion. The name must
// stay: IPAM plugins keep their leases under it (host-local in
// /var/lib/cni/networks/<name>). Istio renames the network and pins
// cniVersion 0.3.1; Ambit does neither.
func converted(name string, data []byte, pc cni.PluginConfig) ([]byte, error) {
	obj, err := parseObject(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if _, ok := obj.get("plugins"); ok {
		return nil, fmt.Errorf("%w: a plugin list in a %s file, which runtimes read as a single plugin", ErrInvalidConfig, filepath.Ext(name))
	}
	var list object
	for _, k := range []string{"cniVersion", "name"} {
		if v, ok := obj.get(k); ok {
			list = append(list, member{k, v})
		}
	}
	e := entry{Type: cni.PluginType, PluginConfig: pc, ConvertedFrom: name}
	list = append(list, member{"plugins", marshalPlugins([]json.RawMessage{bytes.TrimSpace(data), e.marshal()})})
	return pretty(list.marshal())
}

// withoutEntry returns conflist data without Ambit's entries; found reports
// whether there were any. If the list is one that converted made and is
// otherwise as converted left it, restore is the name of the file it came
// from and out that file's content.
func withoutEntry(data []byte) (out []byte, found bool, restore string, err error) {
	l, err := parseConflist(data)
	if err != nil {
		return nil, false, "", err
	}
	var rest []json.RawMessage
	for _, p := range l.plugins {
		if pp := readPlugin(p); pp.Type == cni.PluginType {
			found = true
			if restore == "" {
				restore = pp.ConvertedFrom
			}
			continue
		}
		rest = append(rest, p)
	}
	if !found {
		return data, false, "", nil
	}
	if restore != "" && len(rest) == 1 && restorable(restore) && sameAsConverted(l.obj, rest[0]) {
		out, err = pretty(rest[0])
		return out, true, restore, err
	}
	out, err = l.marshal(rest)
	return out, true, "", err
}

// restorable reports whether name is a file name Install could have
// converted: a bare name, so that a crafted entry cannot make Uninstall
// write outside the conf dir.
func restorable(name string) bool {
	ext := filepath.Ext(name)
	return name == filepath.Base(name) && name != "." && name != ".." && (ext == ".conf" || ext == ".json")
}

// sameAsConverted reports whether list is still what converted made of
// plugin: the keys cniVersion (if the plugin had one), name and plugins,
// with the plugin's values.
func sameAsConverted(list object, plugin json.RawMessage) bool {
	p, err := parseObject(plugin)
	if err != nil {
		return false
	}
	for _, m := range list {
		switch m.key {
		case "plugins":
		case "cniVersion", "name":
			if v, ok := p.get(m.key); !ok || !compactEqual(v, m.value) {
				return false
			}
		default:
			return false
		}
	}
	_, hasVersion := p.get("cniVersion")
	_, listVersion := list.get("cniVersion")
	return hasVersion == listVersion
}

// check vets a conflist before it is written: libcni must load it, and its
// cniVersion must be one the plugin speaks, or every ADD would fail.
func check(data []byte) error {
	l, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if !slices.Contains(cni.SupportedCNIVersions(), l.CNIVersion) {
		return fmt.Errorf("%w: cniVersion %q; %s speaks %v", ErrUnsupportedCNIVersion, l.CNIVersion, cni.PluginType, cni.SupportedCNIVersions())
	}
	return nil
}
