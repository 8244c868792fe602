package lab

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Cgroup2Root returns where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup
// on a unified host, /sys/fs/cgroup/unified on a hybrid one.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }() // read-only
	s := bufio.NewScanner(f)
	for s.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		fields := strings.Fields(s.Text())
		i := slices.Index(fields, "-")
		if i > 0 && i+1 < len(fields) && fields[i+1] == "cgroup2" {
			return fields[4], nil
		}
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mountinfo: the lab needs cgroup v2")
}

// labCgroup is the lab's cgroup; every pod's cgroup is below it.
func labCgroup(name string) string {
	root, err := Cgroup2Root()
	if err != nil {
		return ""
	}
	return filepath.Join(root, "ambit-lab-"+name)
}

// removeCgroupTree kills every process in the tree (cgroup.kill, kernel 5.14)
// and removes its directories, deepest first.
func removeCgroupTree(dir string) error {
	if dir == "" {
		return nil
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		return fmt.Errorf("killing cgroup %s: %w", dir, err)
	}
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.Reverse(dirs)
	var errs []error
	for _, d := range dirs {
		// A cgroup can be removed once its processes are gone, which
		// after cgroup.kill takes a moment.
		ok := waitFor(10*time.Second, func() bool {
			err := os.Remove(d)
			return err == nil || errors.Is(err, fs.ErrNotExist)
		})
		if !ok {
			errs = append(errs, fmt.Errorf("removing cgroup %s: still busy", d))
		}
	}
	return errors.Join(errs...)
}

// removeMountPoints removes the directories that pods' mount namespaces
// created on the host as mount points (listed one per line, in the order
// made), if they are still empty.
func removeMountPoints(list string) error {
	b, err := os.ReadFile(list)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	slices.Sort(lines)
	slices.Reverse(lines) // children before parents
	for _, p := range slices.Compact(lines) {
		if p != "" {
			_ = os.Remove(p) // fails harmlessly if not empty or gone
		}
	}
	return nil
}
