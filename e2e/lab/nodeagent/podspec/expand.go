package podspec

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Expand replaces $(VAR) references in s the way kubelet expands env values,
// command and args (k8s.io/kubernetes third_party/forked/golang/expansion,
// which is not importable):
//
//   - $(VAR) becomes lookup(VAR) when lookup knows VAR, and stays as written
//     when it does not;
//   - $$ becomes a single $, so $$(VAR) is the literal text $(VAR);
//   - a $ followed by anything else, or an unclosed $(, is copied as is.
//
// The API documents this as: "Variable references $(VAR_NAME) are expanded
// using the previously defined environment variables in the container and
// any service environment variables. If a variable cannot be resolved, the
// reference in the input string will be unchanged. Double $$ are reduced to
// a single $, which allows for escaping the $(VAR_NAME) syntax."
func Expand(s string, lookup func(name string) (string, bool)) string {
	if !strings.Contains(s, "$") {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				// Unclosed reference: kubelet copies "$(" and goes on
				// scanning after it.
				b.WriteString("$(")
				i++
				continue
			}
			name := s[i+2 : i+2+end]
			if v, ok := lookup(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + name + ")")
			}
			i += 2 + end
		default:
			// "$x": not a reference; kubelet copies the operator and the
			// character after it.
			b.WriteByte('$')
			b.WriteByte(s[i+1])
			i++
		}
	}
	return b.String()
}

// lookupIn returns a lookup over maps, searched in order.
func lookupIn(maps ...map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		for _, m := range maps {
			if v, ok := m[name]; ok {
				return v, true
			}
		}
		return "", false
	}
}

// ExpandCommand expands $(VAR) references in a container's command and args
// against its environment (as returned by [Env]), as kubelet does before it
// hands them to the runtime. Unknown references stay as written.
func ExpandCommand(c *corev1.Container, env []string) (command, args []string) {
	lookup := lookupIn(envMap(env))
	for _, s := range c.Command {
		command = append(command, Expand(s, lookup))
	}
	for _, s := range c.Args {
		args = append(args, Expand(s, lookup))
	}
	return command, args
}
