package nodeagent

import (
	"fmt"
	"path/filepath"
	"strings"
)

// An image is what a container image name means in the lab: the lab has no
// image store, so every image it can run is a binary built by this repo (or
// a host program), and the host's filesystem is the container's.
type image struct {
	// names are image references without tag or digest.
	names []string
	// entrypoint is the binary run when the container has no command: a
	// name in the bin directory, or an absolute host path.
	entrypoint string
	// args are the image's default arguments (CMD).
	args []string
	// aliases map paths that the real image has to binaries here, for
	// pod specs that name the image's binaries in `command`.
	aliases map[string]string
}

// images is the lab's image table. The README documents it; keep the two in
// step.
var images = []image{
	{
		// Istio's echo test server; the Gateway API conformance suite's
		// echo-advanced image is built from it.
		names:      []string{"gcr.io/istio-testing/app", "docker.io/istio/app", "istio/app", "registry.k8s.io/gateway-api/echo-advanced", "ambit/echo"},
		entrypoint: "echo-server",
		aliases:    map[string]string{"/usr/local/bin/server": "echo-server", "/usr/local/bin/client": "echo-client"},
	},
	{
		names:      []string{"ambit/echo-client"},
		entrypoint: "echo-client",
	},
	{
		names:      []string{"registry.k8s.io/coredns/coredns", "coredns/coredns", "docker.io/coredns/coredns"},
		entrypoint: "coredns",
		aliases:    map[string]string{"/coredns": "coredns"},
	},
	{
		// A shell and curl, as the sleep/curl images of Istio's samples;
		// the host's programs serve.
		names:      []string{"curlimages/curl", "docker.io/curlimages/curl", "docker.io/istio/sleep", "istio/sleep", "ambit/sleep", "busybox", "docker.io/library/busybox"},
		entrypoint: "/bin/sleep",
		args:       []string{"infinity"},
	},
	{
		names:      []string{"ambit/lab"},
		entrypoint: "lab",
	},
	// Ambit's own images, as deploy/ names them.
	{names: []string{"ghcr.io/ambitmesh/ztunnel", "ambit/ztunnel"}, entrypoint: "ztunnel"},
	{names: []string{"ghcr.io/ambitmesh/controller", "ambit/controller"}, entrypoint: "controller"},
	{names: []string{"ghcr.io/ambitmesh/cni", "ambit/cni"}, entrypoint: "ambit-cni-agent"},
}

// ErrImagePull is wrapped by resolveImage for images not in the table.
var ErrImagePull = fmt.Errorf("image not in the lab's image table")

// imageName strips the tag and digest from an image reference.
func imageName(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	// A colon after the last slash is a tag; one before it is a
	// registry port.
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		ref = ref[:i]
	}
	return ref
}

func lookupImage(ref string) (image, bool) {
	name := imageName(ref)
	for _, im := range images {
		for _, n := range im.names {
			if n == name {
				return im, true
			}
		}
	}
	return image{}, false
}

// resolveCommand returns the argv a container runs, as a container runtime
// combines the image's ENTRYPOINT and CMD with the pod's command and args.
func resolveCommand(binDir, ref string, command, args []string) ([]string, error) {
	im, ok := lookupImage(ref)
	if !ok {
		return nil, fmt.Errorf("%w: %q (known: see the README's image table)", ErrImagePull, ref)
	}
	bin := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(binDir, p)
	}
	var argv []string
	switch {
	case len(command) > 0:
		argv = append([]string{}, command...)
		argv = append(argv, args...)
		if alias, ok := im.aliases[argv[0]]; ok {
			argv[0] = bin(alias)
		}
	case len(args) > 0:
		argv = append([]string{bin(im.entrypoint)}, args...)
	default:
		argv = append([]string{bin(im.entrypoint)}, im.args...)
	}
	return argv, nil
}
