package verifier

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseAllowList(t *testing.T) {
	h1, h2 := strings.Repeat("a1", 32), strings.Repeat("B2", 32)
	tests := []struct {
		name  string
		data  string
		want  []string
		error bool
	}{
		{"empty", "", nil, false},
		{"comments and blanks", "# fleet A\n\n  " + h1 + "  # rack 3\n" + h2 + "\r\n", []string{h1, strings.ToLower(h2)}, false},
		{"short hash", h1[:63] + "\n", nil, true},
		{"not hex", strings.Repeat("zz", 32) + "\n", nil, true},
		{"two hashes on a line", h1 + " " + h1 + "\n", nil, true},
		{"SHA-1 length", strings.Repeat("ab", 20) + "\n", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := ParseAllowList([]byte(tt.data))
			if (err != nil) != tt.error {
				t.Fatalf("error = %v, want error %v", err, tt.error)
			}
			if len(set) != len(tt.want) {
				t.Fatalf("got %d hashes, want %d", len(set), len(tt.want))
			}
			for _, h := range tt.want {
				if _, ok := set[h]; !ok {
					t.Fatalf("hash %s missing", h)
				}
			}
		})
	}
}

func TestFileAllowListFailsClosed(t *testing.T) {
	h := strings.Repeat("c3", 32)
	dir := t.TempDir()
	good := filepath.Join(dir, "allow")
	if err := os.WriteFile(good, []byte(h+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte(h+"\nnot-a-hash\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		path    string
		allowed bool
		err     bool
	}{
		{"listed", good, true, false},
		{"missing file", filepath.Join(dir, "missing"), false, true},
		{"path under a regular file (ENOTDIR)", filepath.Join(good, "x"), false, true},
		{"directory", dir, false, true},
		{"one bad line denies all", bad, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, err := FileAllowList(tt.path).Allowed(t.Context(), h)
			if ok != tt.allowed || (err != nil) != tt.err {
				t.Fatalf("Allowed = %v, %v; want %v, error %v", ok, err, tt.allowed, tt.err)
			}
		})
	}
}

func TestFileAllowListReloads(t *testing.T) {
	h1, h2 := strings.Repeat("d4", 32), strings.Repeat("e5", 32)
	path := filepath.Join(t.TempDir(), "allow")
	write := func(content string, mtime time.Time) {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		// Distinct mtimes make the change visible even on coarse clocks.
		if err := os.Chtimes(path, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	al := FileAllowList(path)
	ctx := context.Background()
	check := func(step, h string, want bool, wantErr bool) {
		t.Helper()
		ok, err := al.Allowed(ctx, h)
		if ok != want || (err != nil) != wantErr {
			t.Fatalf("%s: Allowed(%s…) = %v, %v; want %v, error %v", step, h[:4], ok, err, want, wantErr)
		}
	}
	write(h1+"\n", base)
	check("initial", h1, true, false)
	check("initial", h2, false, false)
	write(h2+"\n", base.Add(time.Second))
	check("after edit", h1, false, false)
	check("after edit", h2, true, false)
	write(h2+"\ngarbage\n", base.Add(2*time.Second))
	check("broken edit", h2, false, true)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	check("removed", h2, false, true)
	write(h2+"\n", base.Add(3*time.Second))
	check("restored", h2, true, false)
}

func TestVerifierAllowListErrorDenies(t *testing.T) {
	f := newForge(t)
	dir := t.TempDir()
	v := forgeVerifier(t, f, func(c *Config) {
		c.EKRoots = nil
		c.AllowList = FileAllowList(filepath.Join(dir, "missing"))
	})
	id := f.identity()
	id.EKCertificate = nil
	if _, _, err := v.Begin(t.Context(), id); err == nil || !strings.Contains(err.Error(), "allow-list lookup failed") {
		t.Fatalf("Begin with unreadable allow-list: %v", err)
	}
}
