package workloadapi_test

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"

	"log/slog"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/workloadapi"
)

// recordHandler sends every log record's message and attributes to a
// channel.
type recordHandler struct {
	ch chan string
}

func (h recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h recordHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.String())
		return true
	})
	select {
	case h.ch <- b.String():
	default:
	}
	return nil
}
func (h recordHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return attrHandler{recordHandler: h, attrs: attrs}
}
func (h recordHandler) WithGroup(string) slog.Handler { return h }

type attrHandler struct {
	recordHandler
	attrs []slog.Attr
}

func (h attrHandler) Handle(ctx context.Context, r slog.Record) error {
	r.AddAttrs(h.attrs...)
	return h.recordHandler.Handle(ctx, r)
}
func (h attrHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return attrHandler{recordHandler: h.recordHandler, attrs: append(append([]slog.Attr{}, h.attrs...), attrs...)}
}

// exitingAttestor is the real unix attestor, except that once the /proc reads
// of the victim are done, it kills and reaps the victim: the process exits
// (and its PID becomes reusable) between attestation and the server's check.
type exitingAttestor struct {
	inner  workloadapi.Attestor
	mu     sync.Mutex
	victim *exec.Cmd
	killed chan struct{}
}

func (a *exitingAttestor) Attest(ctx context.Context, pid int32) ([]workloadapi.Selector, error) {
	sels, err := a.inner.Attest(ctx, pid)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.victim != nil && a.victim.Process != nil && int(pid) == a.victim.Process.Pid {
		_ = a.victim.Process.Kill()
		_ = a.victim.Wait()
		a.victim = nil
		close(a.killed)
	}
	return sels, err
}

// TestPIDReuseGuardThroughServer: a caller that exits after its /proc was
// read gets nothing, even though its selectors are entitled: the server's
// check after attestation fails and the Source is never asked.
func TestPIDReuseGuardThroughServer(t *testing.T) {
	att := &exitingAttestor{inner: unix.New(unix.WithPathSelectors(func() bool { return true })), killed: make(chan struct{})}
	logs := make(chan string, 100)
	f := newFixture(t, fixtureOpts{
		attestor: att,
		opts:     []workloadapi.Option{workloadapi.WithLogger(slog.New(recordHandler{ch: logs}))},
	})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// GORACE: a race-built helper otherwise sleeps 1 s at exit.
	cmd.Env = append(os.Environ(), "IRONROOT_WORKLOADAPI_TEST_FETCH="+f.addr, "GORACE=atexit_sleep_ms=0")
	// Start under the lock: Attest reads cmd.Process.
	att.mu.Lock()
	att.victim = cmd
	err := cmd.Start()
	att.mu.Unlock()
	if err != nil {
		t.Fatalf("starting helper client: %v", err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		att.mu.Lock()
		defer att.mu.Unlock()
		if att.victim != nil {
			_ = cmd.Wait()
		}
	})
	ctx := testCtx(t)
	select {
	case <-att.killed:
	case <-ctx.Done():
		t.Fatal("helper was never attested")
	}
	for {
		select {
		case rec := <-logs:
			if strings.HasPrefix(rec, "workload attestation failed") && strings.Contains(rec, "pid="+strconv.Itoa(pid)) {
				// Which check trips first depends on timing: the pidfd, the
				// start time, or gRPC having seen the dead peer's socket close.
				if !strings.Contains(rec, "alive") && !strings.Contains(rec, "start time") && !strings.Contains(rec, "connection closed") {
					t.Fatalf("attestation failed for another reason: %s", rec)
				}
				if n := f.src.subscribes.Load(); n != 0 {
					t.Fatalf("source asked %d times for a caller that failed the PID-reuse check", n)
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("no 'workload attestation failed' log for the exited caller")
		}
	}
}
