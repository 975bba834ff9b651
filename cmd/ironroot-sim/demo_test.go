package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/ironroot/ironroot/simulator/demo"
)

// childEnv makes the test binary act as ironroot-sim (see TestMain): the
// demo sets SOFTHSM2_CONF in its process environment, so it runs in a
// process of its own, as it does for users.
const childEnv = "IRONROOT_SIM_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(run(context.Background(), os.Args[1:], &output{stdout: os.Stdout, stderr: os.Stderr}))
	}
	os.Exit(m.Run())
}

// runChild runs ironroot-sim args in a child process (the test binary).
func runChild(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	// The child's swtpm dies with the child (Pdeathsig); the child dies
	// with the test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running %v: %v", args, err)
	}
	return code, stdout.String(), stderr.String()
}

// swtpmsUnder lists swtpm processes serving a state under dir.
func swtpmsUnder(t *testing.T, dir string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || len(b) == 0 {
			continue // exited meanwhile, or a zombie
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "swtpm" {
			continue
		}
		for _, a := range args {
			if strings.HasPrefix(a, "dir="+dir+"/") {
				found = append(found, strings.Join(args, " "))
			}
		}
	}
	return found
}

func TestDemo(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	agentID := regexp.MustCompile(`spiffe://example\.org/ironroot/agent/tpm/[0-9a-f]{64}\b`)
	// Twice in the same directory: `make demo` must work again.
	for run := 1; run <= 2; run++ {
		code, stdout, stderr := runChild(t, "demo", "-dir", dir)
		if code != 0 {
			t.Fatalf("run %d: exit %d\nstdout:\n%s\nstderr:\n%s", run, code, stdout, stderr)
		}
		for _, c := range demo.Checks {
			if !strings.Contains(stdout, "[ok] "+c) {
				t.Errorf("run %d: output lacks check %q", run, c)
			}
		}
		for _, want := range []string{
			"All 14 checks passed",
			"pkcs11:token=ironroot-demo",
			"object=demo-ca;type=private",
			"tpm:ek_hash:",
			"tpm:pcr:sha256:7:",
			"EK certificate not trusted",
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("run %d: output lacks %q", run, want)
			}
		}
		if !agentID.MatchString(stdout) {
			t.Errorf("run %d: output names no agent ID", run)
		}
		// No secret in the output: the PIN stays in its file.
		pins, _ := filepath.Glob(filepath.Join(dir, "hsm", "pins", "*.pin"))
		if len(pins) != 1 {
			t.Fatalf("run %d: %d PIN files, want 1", run, len(pins))
		}
		pin, err := os.ReadFile(pins[0])
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(stdout+stderr, string(pin)) || strings.Contains(stdout, "pin-value") {
			t.Errorf("run %d: the PIN appears in the output", run)
		}
		if left := swtpmsUnder(t, dir); len(left) > 0 {
			t.Fatalf("run %d: swtpm left running: %v", run, left)
		}
		for _, f := range []string{demo.MarkerFile, "certs/agent.pem", "certs/hsm-ca.pem", "certs/agent-key.tpm", "tpm/tpm2-00.permall"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				t.Errorf("run %d: state %s missing: %v", run, f, err)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, demo.PIDFile)); err == nil {
			t.Errorf("run %d: pid file left although swtpm stopped", run)
		}
		if t.Failed() {
			t.Logf("output:\n%s", stdout)
			return
		}
	}
}

func TestDemoRefusesForeignDirectory(t *testing.T) {
	dir := t.TempDir()
	precious := filepath.Join(dir, "precious.txt")
	if err := os.WriteFile(precious, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCmd(t, "demo", "-dir", dir)
	if code != 1 || !strings.Contains(stderr, "not made by the demo") {
		t.Fatalf("exit %d, stderr %q: want 1 and a refusal", code, stderr)
	}
	if _, err := os.Stat(precious); err != nil {
		t.Fatalf("the demo touched a directory it did not make: %v", err)
	}
	if code, _, _ := runCmd(t, "demo", "-dir", dir, "extra"); code != 2 {
		t.Errorf("positional argument: exit %d, want 2", code)
	}
}
