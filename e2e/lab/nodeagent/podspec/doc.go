// Package podspec turns a pod's spec into what a plain host process needs to
// run as one of the pod's containers in the lab: the contents of its volumes
// on disk, the list of bind mounts, and its environment.
//
// The lab's node agent stands in for kubelet. It runs containers as host
// processes in the pod's network, UTS and mount namespaces, with the host
// filesystem as the container filesystem. For each volume this package
// materialises a host directory under <root>/<podUID>/volumes/<name>/ (or
// names the hostPath as is); the agent bind-mounts what [Volumes.Mounts]
// returns inside the pod's mount namespace. [Env] computes the environment
// the way kubelet's makeEnvironmentVariables does, plus the two variables a
// container runtime would add (HOSTNAME, and PATH from the image, here the
// host).
//
// The pure parts (the $(VAR) expansion, the service link variables, the
// downward API field and resource resolution, the volume payloads) take data
// and return data; [Volumes] and [Env] are the thin shells that talk to the
// API server and the filesystem. They only Get single objects, never List or
// Watch, because the node agent runs as system:node:<name> under the Node
// authorizer, which allows exactly that for objects its pods reference.
//
// What it deliberately does not do:
//
//   - No mounts. Memory-backed emptyDirs (medium: Memory) are plain
//     directories on the host filesystem, not tmpfs, and secrets therefore
//     land on disk; sizeLimit is not enforced. The caller does every bind
//     mount.
//   - No persistent, CSI, ephemeral, image or network volumes: Setup refuses
//     them with [ErrUnsupported]. Projected clusterTrustBundle and
//     podCertificate sources are refused the same way.
//   - No ownership changes: files stay owned by the agent (root). fsGroup,
//     fsUser and SELinux labels are ignored; file modes are honoured.
//   - No ..data symlink swap. Kubelet's AtomicWriter publishes a whole volume
//     at once by swapping a ..data symlink; here each file is written to a
//     temporary file in the same directory and renamed over the old one, so
//     each file changes atomically but a reader may see a new file next to
//     an old one for a moment. As with kubelet, a file bind-mounted through
//     subPath keeps the inode it was mounted with and never sees an update.
//   - No informers and no caches shared between pods: every Setup, Refresh
//     and Env call Gets what it needs. The lab is small.
//   - No /etc/hosts, /etc/resolv.conf or termination-log mounts, no HOME:
//     those belong to the agent, which knows the pod's IPs, DNS and user.
//   - No env fileKeyRef (EnvFiles) and no pod-level resources for
//     resourceFieldRef.
package podspec
