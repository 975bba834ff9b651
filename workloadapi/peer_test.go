package workloadapi

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseStartTime(t *testing.T) {
	tail := " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21\n"
	tests := []struct {
		name    string
		in      string
		want    uint64
		wantErr bool
	}{
		{name: "plain", in: "123 (sleep)" + tail, want: 424242},
		{name: "command with spaces and parens", in: "123 (a) b (c) d)" + tail, want: 424242},
		{name: "no command", in: "123 sleep S 1", wantErr: true},
		{name: "too few fields", in: "123 (x) S 1 2 3", wantErr: true},
		{name: "not a number", in: "123 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 xx 20", wantErr: true},
		{name: "empty", in: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStartTime([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("error = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("start time %d, want %d", got, tt.want)
			}
		})
	}
}

// acceptHelper starts a helper process that connects to a fresh socket and
// returns the server side of its connection and the process.
func acceptHelper(t *testing.T) (*net.UnixConn, *exec.Cmd) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperDialEnv+"="+sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting helper: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	conn, err := lis.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, cmd
}

func TestCallerIdentifiesPeer(t *testing.T) {
	conn, cmd := acceptHelper(t)
	c, err := newCaller(conn)
	if err != nil {
		t.Fatalf("newCaller: %v", err)
	}
	t.Cleanup(c.close)
	if int(c.PID) != cmd.Process.Pid {
		t.Fatalf("caller pid %d, want helper pid %d", c.PID, cmd.Process.Pid)
	}
	if c.UID != uint32(os.Getuid()) || c.GID != uint32(os.Getgid()) {
		t.Fatalf("caller uid/gid %d/%d, want %d/%d", c.UID, c.GID, os.Getuid(), os.Getgid())
	}
	if c.pidfd < 0 {
		t.Fatal("no pidfd held on a kernel that has pidfds")
	}
	if err := c.Verify(); err != nil {
		t.Fatalf("Verify of a live caller: %v", err)
	}
}

// TestCallerPIDReuseGuard checks every way Verify must fail: the caller
// exited, the PID names a process with another start time, the connection
// closed.
func TestCallerPIDReuseGuard(t *testing.T) {
	tests := []struct {
		name    string
		tamper  func(t *testing.T, c *Caller, cmd *exec.Cmd)
		wantErr string
	}{
		{
			name: "caller exited and was reaped",
			tamper: func(t *testing.T, c *Caller, cmd *exec.Cmd) {
				if err := cmd.Process.Kill(); err != nil {
					t.Fatal(err)
				}
				_ = cmd.Wait()
			},
			wantErr: "alive",
		},
		{
			name: "caller exited, pidfd unavailable (start time check alone)",
			tamper: func(t *testing.T, c *Caller, cmd *exec.Cmd) {
				c.mu.Lock()
				_ = unix.Close(c.pidfd)
				c.pidfd = -1
				c.mu.Unlock()
				if err := cmd.Process.Kill(); err != nil {
					t.Fatal(err)
				}
				_ = cmd.Wait()
			},
			wantErr: "start time",
		},
		{
			name: "pid now names a process with another start time",
			tamper: func(t *testing.T, c *Caller, cmd *exec.Cmd) {
				c.mu.Lock()
				c.startTime++
				c.mu.Unlock()
			},
			wantErr: "replaced",
		},
		{
			name:    "connection closed",
			tamper:  func(t *testing.T, c *Caller, cmd *exec.Cmd) { c.close() },
			wantErr: "closed",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, cmd := acceptHelper(t)
			c, err := newCaller(conn)
			if err != nil {
				t.Fatalf("newCaller: %v", err)
			}
			t.Cleanup(c.close)
			if err := c.Verify(); err != nil {
				t.Fatalf("Verify before tampering: %v", err)
			}
			tt.tamper(t, c, cmd)
			err = c.Verify()
			if err == nil {
				t.Fatal("Verify succeeded, want failure")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Verify error %q, want it to mention %q", err, tt.wantErr)
			}
		})
	}
}

func TestNilCallerFailsVerify(t *testing.T) {
	var c *Caller
	if err := c.Verify(); err == nil {
		t.Fatal("nil caller verified")
	}
}
