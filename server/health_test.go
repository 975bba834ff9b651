package server_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ironroot/ironroot/server"
	"github.com/ironroot/ironroot/server/config"
)

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestHealthEndpoints(t *testing.T) {
	port := freeTCPPort(t)
	e := newEnv(t, func(c *config.Config) {
		c.Health = config.Health{Enabled: true, BindAddress: "127.0.0.1", BindPort: port, LivePath: "/live", ReadyPath: "/ready"}
	})
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	get := func(path string) (int, string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get(base + path)
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(body)
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if code, body := get("/live"); code != http.StatusOK || !strings.Contains(body, "ok") {
		t.Errorf("/live: %d %q", code, body)
	}
	if code, body := get("/ready"); code != http.StatusOK || !strings.Contains(body, "ready") {
		t.Errorf("/ready: %d %q", code, body)
	}
	// The admin socket's directory admits only the server's user.
	fi, err := os.Stat(filepath.Dir(e.cfg.SocketPath))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("admin socket directory mode %v, want 0700", fi.Mode().Perm())
	}
	if code, out, _ := e.cli("healthcheck"); code != 0 || !strings.Contains(out, "healthy") {
		t.Errorf("healthcheck: %d %s", code, out)
	}
	e.shutdown()
	if _, err := http.Get(base + "/live"); err == nil {
		t.Error("/live still answers after shutdown")
	}
}

// TestStartRefusals: a bad HSM, EK root directory or port stops start-up
// with a message naming the key, leaving no socket behind; a later start
// with the right configuration works (nothing was left half-open).
func TestStartRefusals(t *testing.T) {
	e := newEnv(t)
	good := *e.cfg
	e.shutdown()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	emptyRoots := t.TempDir()
	cases := []struct {
		name   string
		modify func(c *config.Config)
		want   string
	}{
		{"missing token", func(c *config.Config) {
			c.HSM = strings.Replace(c.HSM, "token="+e.token.Label, "token=no-such-token", 1)
		}, "server.hsm"},
		{"wrong PIN", func(c *config.Config) {
			c.HSM = "pkcs11:token=" + e.token.Label + "?module-path=" + e.token.ModulePath + "&pin-value=0000-wrong"
		}, "server.hsm"},
		{"missing module", func(c *config.Config) {
			c.HSM = "pkcs11:token=" + e.token.Label + "?module-path=/nonexistent/libpkcs11.so&pin-value=1"
		}, "server.hsm"},
		{"EK root directory without a root", func(c *config.Config) { c.NodeAttestation.EKRootDir = emptyRoots }, "ek_root_dir"},
		{"port in use", func(c *config.Config) { c.ServerPort = busy.Addr().(*net.TCPAddr).Port }, "bind_port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.modify(&cfg)
			s, err := server.New(context.Background(), &cfg, nil)
			if err == nil {
				s.Close()
				t.Fatal("server started")
			}
			t.Logf("refused: %v", err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name %s", err, tc.want)
			}
			if strings.Contains(err.Error(), "0000-wrong") || strings.Contains(err.Error(), e.token.PIN) {
				t.Fatalf("error %q shows a PIN", err)
			}
			if _, err := os.Stat(cfg.SocketPath); err == nil {
				t.Fatal("a failed start left the admin socket")
			}
		})
	}
	// The right configuration still starts: the failed attempts released
	// the PKCS#11 module and the store.
	s, err := server.New(context.Background(), &good, nil)
	if err != nil {
		t.Fatalf("start after refusals: %v", err)
	}
	s.Close()
}
