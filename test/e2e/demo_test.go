package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// TestDemoScript runs `make demo`'s script (simulator/demo.sh) on the built
// binaries: it must bring the whole chain up, print what a person wants to
// see, leave everything running with a usable .demo/env, work a second time,
// and `down` must stop every process and remove the directory.
func TestDemoScript(t *testing.T) {
	root, err := moduleRoot(context.Background(), "go")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(shortDir(t), "demo")
	env := append(os.Environ(),
		"DEMO_DIR="+dir,
		"DEMO_BIN="+e2e.bin,
		"DEMO_SERVER_PORT="+strconv.Itoa(freePort(t)),
		"DEMO_HEALTH_PORT="+strconv.Itoa(freePort(t)),
		"DEMO_TPM_PORT="+strconv.Itoa(freePort(t)),
	)
	script := filepath.Join(root, "simulator", "demo.sh")
	demo := func(arg string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "bash", script, arg)
		cmd.Env = env
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("demo.sh %s: %v\n%s", arg, err, out.String())
		}
		return out.String()
	}
	t.Cleanup(func() {
		if _, err := os.Stat(dir); err == nil {
			demo("down")
		}
	})

	for run := 1; run <= 2; run++ {
		out := demo("up")
		for _, want := range []string{
			"agent ID : spiffe://example.org/ironroot/agent/tpm/",
			"tpm:ek_hash:",
			"tpm:manufacturer:",
			"tpm:pcr:sha256:0:",
			"SPIFFE ID:\t\tspiffe://example.org/demo/workload",
			"verifies against the example.org bundle",
			"SVID is valid.",
			"x509  active",
			"jwt   active",
			"pkcs11:token=ironroot-ca",
		} {
			if !strings.Contains(out, want) {
				t.Fatalf("run %d: the demo output lacks %q:\n%s", run, want, out)
			}
		}
		if strings.Contains(out, "pin-value") {
			t.Fatalf("run %d: the demo printed a PIN", run)
		}
	}

	envFile, err := os.ReadFile(filepath.Join(dir, "env"))
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(envFile)), "\n") {
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if !ok {
			t.Fatalf("env line %q", line)
		}
		vars[k] = strings.Trim(v, "'")
	}
	for _, k := range []string{"SPIFFE_ENDPOINT_SOCKET", "IRONROOT_SERVER_SOCKET", "IRONROOT_SERVER_ADDRESS",
		"IRONROOT_TRUST_BUNDLE", "IRONROOT_TPM", "SOFTHSM2_CONF", "IRONROOT_HSM_URI"} {
		if vars[k] == "" {
			t.Errorf(".demo/env lacks %s", k)
		}
	}
	// Any go-spiffe program works against the running demo.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	x509, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(vars["SPIFFE_ENDPOINT_SOCKET"]))
	if err != nil {
		t.Fatalf("go-spiffe against the demo: %v", err)
	}
	if x509.ID.String() != "spiffe://example.org/demo/workload" {
		t.Fatalf("demo workload SVID is %s", x509.ID)
	}
	if code, out, errOut := run(t, serverBin, []string{"agent", "list", "-socketPath", vars["IRONROOT_SERVER_SOCKET"]}); code != 0 || !strings.Contains(out, "Found 1 attested agent") {
		t.Fatalf("server CLI against the demo: %d %s %s", code, out, errOut)
	}

	var pids []int
	for _, p := range []string{"agent.pid", "server.pid", "swtpm.pid"} {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		pids = append(pids, pid)
	}
	demo("down")
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("demo-down left %s: %v", dir, err)
	}
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil && !isZombie(pid) {
			t.Errorf("process %d is still running after demo-down", pid)
		}
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(fields) > 0 && fields[0] == "Z"
}
