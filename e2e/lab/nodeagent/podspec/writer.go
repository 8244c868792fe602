package podspec

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
)

// tmpPrefix starts the names of files being written. User paths cannot
// start with ".." (cleanPayload), so these never collide with a key.
const tmpPrefix = "..tmp-"

// writePayload makes dir hold exactly p: it removes what p does not name
// and writes each file that is new or changed to a temporary file in its
// directory, sets its mode, and renames it into place, so a reader sees the
// old file or the new one, never a partial one. Files whose content and
// mode are already right are left alone, inode and all.
//
// Kubelet's AtomicWriter instead writes a new timestamped directory and
// swaps a ..data symlink, which publishes all files at once. A rename per
// file is simpler and enough for the lab; see the package doc for what a
// reader can observe.
func writePayload(dir string, p payload) error {
	p, err := cleanPayload(p)
	if err != nil {
		return err
	}
	dirs := map[string]bool{}
	for name := range p {
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}

	// Remove what is not wanted: stale files, directories that no longer
	// hold any file, leftovers of an interrupted write, and anything whose
	// kind (file or directory) changed.
	err = filepath.WalkDir(dir, func(full string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if full == dir {
			return nil
		}
		rel, err := filepath.Rel(dir, full)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if dirs[rel] {
				return nil
			}
			if err := os.RemoveAll(full); err != nil {
				return err
			}
			return fs.SkipDir
		}
		if _, ok := p[rel]; ok && d.Type().IsRegular() {
			return nil
		}
		return os.Remove(full)
	})
	if err != nil {
		return fmt.Errorf("removing stale files from %s: %w", dir, err)
	}

	names := make([]string, 0, len(p))
	for name := range p {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		full := filepath.Join(dir, filepath.FromSlash(name))
		if err := writeFile(full, p[name]); err != nil {
			return fmt.Errorf("writing %s: %w", full, err)
		}
	}
	return nil
}

// writeFile puts f at full atomically unless it is already there.
func writeFile(full string, f file) error {
	mode := fs.FileMode(f.mode) & fs.ModePerm
	if same(full, f.data, mode) {
		return nil
	}
	parent := filepath.Dir(full)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(parent, tmpPrefix+filepath.Base(full)+"-*")
	if err != nil {
		return err
	}
	// Best effort, and a no-op after the rename: a temporary file left over
	// is removed by the next write of the directory.
	defer func() { _ = os.Remove(tmp.Name()) }()
	_, err = tmp.Write(f.data)
	// Chmod after create, so that the agent's umask does not narrow the
	// mode the pod asked for.
	err = errors.Join(err, tmp.Chmod(mode), tmp.Close())
	if err != nil {
		return err
	}
	return os.Rename(tmp.Name(), full)
}

func same(full string, data []byte, mode fs.FileMode) bool {
	st, err := os.Lstat(full)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != mode || st.Size() != int64(len(data)) {
		return false
	}
	old, err := os.ReadFile(full)
	return err == nil && bytes.Equal(old, data)
}
