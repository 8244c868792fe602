package podspec

import (
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// tree lists the files under dir as path -> "content mode".
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[filepath.ToSlash(rel)] = string(b) + " " + st.Mode().String()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func dirs(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && p != dir {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestWritePayloadModesAndLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	err := writePayload(dir, payload{
		"token":           f("abc", 0o644),
		"secret/key.pem":  f("KEY", 0o600),
		"a/b/c/deep":      f("deep", 0o400),
		"exec.sh":         f("#!/bin/sh", 0o755),
		"world-writeable": f("w", 0o666), // beyond the usual umask
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"token":           "abc -rw-r--r--",
		"secret/key.pem":  "KEY -rw-------",
		"a/b/c/deep":      "deep -r--------",
		"exec.sh":         "#!/bin/sh -rwxr-xr-x",
		"world-writeable": "w -rw-rw-rw-",
	}
	if got := tree(t, dir); !maps.Equal(got, want) {
		t.Errorf("files = %v, want %v", got, want)
	}
	if got, want := dirs(t, dir), []string{"a", "a/b", "a/b/c", "secret"}; !slices.Equal(got, want) {
		t.Errorf("dirs = %q, want %q", got, want)
	}
}

func TestWritePayloadUpdate(t *testing.T) {
	tests := []struct {
		name         string
		before       payload
		setup        func(t *testing.T, dir string)
		after        payload
		want         map[string]string
		wantDirs     []string
		sameInode    []string // files that must not have been rewritten
		changedInode []string // files that must have been replaced
	}{
		{
			name:      "unchanged file keeps its inode",
			before:    payload{"a": f("1", 0o644), "b": f("2", 0o644)},
			after:     payload{"a": f("1", 0o644), "b": f("22", 0o644)},
			want:      map[string]string{"a": "1 -rw-r--r--", "b": "22 -rw-r--r--"},
			sameInode: []string{"a"}, changedInode: []string{"b"},
		},
		{
			name:         "mode change rewrites",
			before:       payload{"a": f("1", 0o644)},
			after:        payload{"a": f("1", 0o600)},
			want:         map[string]string{"a": "1 -rw-------"},
			changedInode: []string{"a"},
		},
		{
			name:     "removed key and its empty directory go",
			before:   payload{"keep": f("k", 0o644), "gone/deep/x": f("x", 0o644), "dir/stay": f("s", 0o644), "dir/go": f("g", 0o644)},
			after:    payload{"keep": f("k", 0o644), "dir/stay": f("s", 0o644)},
			want:     map[string]string{"keep": "k -rw-r--r--", "dir/stay": "s -rw-r--r--"},
			wantDirs: []string{"dir"},
		},
		{
			name:     "file becomes a directory",
			before:   payload{"a": f("file", 0o644)},
			after:    payload{"a/b": f("nested", 0o644)},
			want:     map[string]string{"a/b": "nested -rw-r--r--"},
			wantDirs: []string{"a"},
		},
		{
			name:   "directory becomes a file",
			before: payload{"a/b": f("nested", 0o644)},
			after:  payload{"a": f("file", 0o644)},
			want:   map[string]string{"a": "file -rw-r--r--"},
		},
		{
			name:   "empty payload empties the volume",
			before: payload{"a": f("1", 0o644), "b/c": f("2", 0o644)},
			after:  payload{},
			want:   map[string]string{},
		},
		{
			name: "leftovers and strangers removed",
			setup: func(t *testing.T, dir string) {
				for _, name := range []string{tmpPrefix + "a-123", "stranger"} {
					if err := os.WriteFile(filepath.Join(dir, name), []byte("junk"), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			},
			after: payload{"a": f("1", 0o644)},
			want:  map[string]string{"a": "1 -rw-r--r--"},
		},
		{
			name: "symlink replaced by a file",
			setup: func(t *testing.T, dir string) {
				target := filepath.Join(t.TempDir(), "outside")
				if err := os.WriteFile(target, []byte("outside"), 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(target, filepath.Join(dir, "a")); err != nil {
					t.Fatal(err)
				}
			},
			after: payload{"a": f("1", 0o644)},
			want:  map[string]string{"a": "1 -rw-r--r--"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.before != nil {
				if err := writePayload(dir, tc.before); err != nil {
					t.Fatal(err)
				}
			}
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			stats := map[string]os.FileInfo{}
			for _, name := range slices.Concat(tc.sameInode, tc.changedInode) {
				st, err := os.Stat(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				stats[name] = st
			}
			if err := writePayload(dir, tc.after); err != nil {
				t.Fatal(err)
			}
			if got := tree(t, dir); !maps.Equal(got, tc.want) {
				t.Errorf("files = %v, want %v", got, tc.want)
			}
			if got := dirs(t, dir); !slices.Equal(got, tc.wantDirs) {
				t.Errorf("dirs = %q, want %q", got, tc.wantDirs)
			}
			for name, before := range stats {
				st, err := os.Stat(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				same := os.SameFile(before, st)
				if want := slices.Contains(tc.sameInode, name); same != want {
					t.Errorf("%s: same inode = %v, want %v", name, same, want)
				}
			}
		})
	}
}

func TestWritePayloadInvalidTouchesNothing(t *testing.T) {
	dir := t.TempDir()
	if err := writePayload(dir, payload{"a": f("1", 0o644)}); err != nil {
		t.Fatal(err)
	}
	if err := writePayload(dir, payload{"../escape": f("x", 0o644)}); err == nil {
		t.Fatal("writePayload accepted a path with '..'")
	}
	if got, want := tree(t, dir), map[string]string{"a": "1 -rw-r--r--"}; !maps.Equal(got, want) {
		t.Errorf("files = %v, want %v", got, want)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escape")); err == nil {
		t.Error("a file escaped the volume")
	}
}
