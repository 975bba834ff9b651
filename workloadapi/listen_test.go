package workloadapi_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ironroot/ironroot/workloadapi"
)

func TestListen(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr string
	}{
		{name: "creates the directory", prepare: func(t *testing.T, path string) {}},
		{name: "replaces a stale socket", prepare: func(t *testing.T, path string) {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close() // the file stays, nobody answers
		}},
		{name: "refuses a live socket", prepare: func(t *testing.T, path string) {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, wantErr: "in use"},
		{name: "refuses to remove a regular file", prepare: func(t *testing.T, path string) {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "not a socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "a", "b", "agent.sock")
			tt.prepare(t, path)
			l, err := workloadapi.Listen(path)
			if tt.wantErr != "" {
				if err == nil {
					l.Close()
					t.Fatalf("Listen succeeded, want error %q", tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Listen error %q, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			defer l.Close()
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o777 {
				t.Fatalf("socket mode %v, want a socket with 0777", fi.Mode())
			}
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatalf("dialing the new socket: %v", err)
			}
			c.Close()
		})
	}
	if _, err := workloadapi.Listen(""); err == nil {
		t.Fatal("Listen(\"\") succeeded")
	}
}

func TestParseAddress(t *testing.T) {
	tests := []struct {
		addr     string
		network  string
		want     string
		wantErr  bool
		validErr bool // go-spiffe rejects it too
	}{
		{addr: "unix:///run/agent.sock", network: "unix", want: "/run/agent.sock"},
		{addr: "unix:/run/agent.sock", network: "unix", want: "/run/agent.sock"},
		{addr: "tcp://127.0.0.1:8000", network: "tcp", want: "127.0.0.1:8000"},
		{addr: "tcp://[::1]:8000", network: "tcp", want: "[::1]:8000"},
		{addr: "tcp://127.0.0.1:8000/foo", wantErr: true, validErr: true},
		{addr: "tcp://localhost:8000", wantErr: true, validErr: true},
		{addr: "tcp://127.0.0.1", wantErr: true, validErr: true},
		{addr: "tcp://u@127.0.0.1:80", wantErr: true, validErr: true},
		{addr: "tcp://127.0.0.1:80?x=1", wantErr: true, validErr: true},
		{addr: "tcp://127.0.0.1:80#f", wantErr: true, validErr: true},
		{addr: "tcp:opaque", wantErr: true, validErr: true},
		{addr: "unix://", wantErr: true, validErr: true},
		{addr: "unix:///a?x=1", wantErr: true, validErr: true},
		{addr: "unix:///a#f", wantErr: true, validErr: true},
		{addr: "unix://u@/a", wantErr: true, validErr: true},
		{addr: "unix:opaque", wantErr: true, validErr: true},
		{addr: "/run/agent.sock", wantErr: true, validErr: true},
		{addr: "http://127.0.0.1:80", wantErr: true, validErr: true},
		{addr: "%zz", wantErr: true, validErr: true},
		// go-spiffe lets this through; it cannot be dialed.
		{addr: "unix://relative/path", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			if err := workloadapi.ValidateAddress(tt.addr); (err != nil) != tt.validErr {
				t.Fatalf("ValidateAddress error = %v, want error %v", err, tt.validErr)
			}
			a, err := workloadapi.ParseAddress(tt.addr)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseAddress error = %v, wantErr %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if a.Network() != tt.network || a.String() != tt.want {
				t.Fatalf("ParseAddress = %s %s, want %s %s", a.Network(), a, tt.network, tt.want)
			}
		})
	}
	if got := workloadapi.SocketPathAddress("/run/a b.sock"); got != "unix:///run/a%20b.sock" {
		t.Fatalf("SocketPathAddress = %q", got)
	}
}

func TestParseSelector(t *testing.T) {
	tests := []struct {
		in      string
		want    workloadapi.Selector
		wantErr bool
	}{
		{in: "unix:uid:1000", want: workloadapi.Selector{Type: "unix", Value: "uid:1000"}},
		{in: "unix:path:/usr/bin/a:b", want: workloadapi.Selector{Type: "unix", Value: "path:/usr/bin/a:b"}},
		{in: "unix", wantErr: true},
		{in: ":x", wantErr: true},
		{in: "unix:", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := workloadapi.ParseSelector(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if !tt.wantErr && got.String() != tt.in {
				t.Fatalf("String() = %q, want %q", got.String(), tt.in)
			}
		})
	}
}
