package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// readFile returns a file's content and permissions.
func readFile(path string) ([]byte, fs.FileMode, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	var b bytes.Buffer
	if _, err := b.ReadFrom(f); err != nil {
		return nil, 0, fmt.Errorf("reading %s: %w", path, err)
	}
	return b.Bytes(), st.Mode().Perm(), nil
}

// writeFileAtomic replaces path with data: a temporary file in the same
// directory (so that the rename stays on one filesystem), written and
// fsynced, then renamed over path, then the directory fsynced so that the
// rename survives a crash. Readers see the old file or the new one, never
// a part; a runtime exec'ing the old binary keeps its inode and does not
// get ETXTBSY. The temporary name starts with a dot and ends in .tmp, so
// no runtime mistakes it for a network config or a plugin.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir, base := filepath.Split(path)
	tmp, err := os.CreateTemp(dir, "."+base+".*.tmp")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
			err = fmt.Errorf("writing %s: %w", path, err)
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	// CreateTemp makes 0600; the umask does not apply to Chmod.
	if err := tmp.Chmod(perm); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	if dir == "" {
		dir = "."
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }()
	return d.Sync()
}

// copyBinary puts the bytes of src at dst, executable, atomically, unless
// dst already holds them. It reports whether it wrote.
func copyBinary(src, dst string) (bool, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return false, fmt.Errorf("reading the plugin binary: %w", err)
	}
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
		if st, err := os.Stat(dst); err == nil && st.Mode().Perm()&0o111 != 0 {
			return false, nil
		}
	}
	if err := writeFileAtomic(dst, data, 0o755); err != nil {
		return false, err
	}
	return true, nil
}

// removeFile removes path and makes the removal durable; a file that is
// already gone is fine.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return syncDir(filepath.Dir(path))
}
