package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ironroot/ironroot/hsm"
)

func TestHSMInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "hsm")
	code, stdout, stderr := runCmd(t, "hsm", "init", "-dir", dir, "-label", "ca", "-pin", "98765432")
	if code != 0 {
		t.Fatalf("hsm init exited %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 2 {
		t.Fatalf("output = %q, want two lines", stdout)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if want := "export SOFTHSM2_CONF='" + conf + "'"; lines[0] != want {
		t.Errorf("line 1 = %q, want %q", lines[0], want)
	}
	uriText, ok := strings.CutPrefix(lines[1], "export HSM_URI='")
	if !ok || !strings.HasSuffix(uriText, "'") {
		t.Fatalf("line 2 = %q", lines[1])
	}
	u, err := hsm.ParseURI(strings.TrimSuffix(uriText, "'"))
	if err != nil {
		t.Fatalf("printed URI: %v", err)
	}
	if u.Token != "ca" || u.ModulePath == "" || u.PINSource == "" {
		t.Errorf("URI = %s", u)
	}
	if pin, err := u.PIN(); err != nil || pin != "98765432" {
		t.Errorf("PIN from pin-source = %q, %v", pin, err)
	}
	if strings.Contains(stdout, "98765432") || strings.Contains(stderr, "98765432") {
		t.Error("the PIN was printed")
	}
	// The token is usable with the standard tools and that PIN.
	cmd := exec.Command("pkcs11-tool", "--module", u.ModulePath, "--token-label", "ca", "--login", "--pin", "98765432",
		"--list-objects")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("pkcs11-tool login: %v\n%s", err, out)
	}

	// A second token in the same directory; the first label is taken.
	if code, _, stderr := runCmd(t, "hsm", "init", "-dir", dir, "-label", "ca2"); code != 0 {
		t.Errorf("second token: exit %d: %s", code, stderr)
	}
	if code, _, stderr := runCmd(t, "hsm", "init", "-dir", dir, "-label", "ca"); code != 1 || !strings.Contains(stderr, "already exists") {
		t.Errorf("duplicate label: exit %d: %s", code, stderr)
	}
}

func TestHSMInitUsage(t *testing.T) {
	for _, args := range [][]string{
		{"hsm", "init", "-label", "x"},
		{"hsm", "init", "-dir", t.TempDir()},
		{"hsm", "init", "-dir", t.TempDir(), "-label", "x", "extra"},
	} {
		if code, _, stderr := runCmd(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, code, stderr)
		}
	}
}
