package workloadapi_test

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// copyExecutable copies the test binary where user nobody can run it.
func copyExecutable(t *testing.T, dir string) string {
	t.Helper()
	src, err := os.Open("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst := filepath.Join(dir, "helper")
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, src); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}

// openUp makes every directory from path up to (not including) stop
// traversable by other users.
func openUp(t *testing.T, path, stop string) {
	t.Helper()
	for d := path; d != stop && d != "/" && d != "."; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOtherUserIsIdentifiedByKernel runs a go-spiffe client as nobody: it is
// identified as unix:uid:65534 by the kernel, gets the identity registered
// for that uid, and is refused when only the test's own uid is registered.
func TestOtherUserIsIdentifiedByKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("running a client as another user needs root")
	}
	tests := []struct {
		name     string
		entitled []string
		want     string
	}{
		{"registered as nobody", []string{"unix:user:nobody"}, "svid: spiffe://example.org/workload/0"},
		{"registered by uid", []string{"unix:uid:65534"}, "svid: spiffe://example.org/workload/0"},
		{"only root registered", []string{"unix:uid:0"}, "PermissionDenied"},
	}
	binDir := t.TempDir()
	openUp(t, binDir, os.TempDir())
	helper := copyExecutable(t, binDir)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, fixtureOpts{entitled: tt.entitled})
			openUp(t, filepath.Dir(f.sock), os.TempDir())

			cmd := exec.Command(helper, "-test.run=^$")
			// GORACE: a race-built helper otherwise sleeps 1 s at exit.
			cmd.Env = append(os.Environ(), "IRONROOT_WORKLOADAPI_TEST_FETCH="+f.addr, "GORACE=atexit_sleep_ms=0")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			var out strings.Builder
			cmd.Stdout = &out
			cmd.Stderr = &out
			if err := cmd.Start(); err != nil {
				t.Fatalf("starting helper as nobody: %v", err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill() })
			if err := cmd.Wait(); err != nil {
				t.Fatalf("helper: %v\n%s", err, out.String())
			}
			if !strings.Contains(out.String(), tt.want) {
				t.Fatalf("helper said %q, want %q", out.String(), tt.want)
			}
		})
	}
}
