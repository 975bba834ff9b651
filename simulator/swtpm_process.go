package simulator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// SWTPM is a running `swtpm socket` process serving one State. It is stopped
// by Stop, and killed by the kernel if the test process dies first.
type SWTPM struct {
	state    *State
	cmd      *exec.Cmd
	done     chan struct{}
	output   *boundedBuffer
	tmpDir   string // removed by Stop; empty when the caller chose the paths
	network  string // "unix" or "tcp"
	dataAddr string
	ctrlAddr string

	// mu serializes Reboot and PowerLoss: each is a sequence of commands
	// on both channels.
	mu       sync.Mutex
	stopOnce sync.Once
	stopErr  error
}

type startConfig struct {
	tcp        bool
	tcpAddr    string
	socketPath string
}

// StartOption configures Start.
type StartOption func(*startConfig)

// WithTCP serves the data and control channels on free TCP ports of
// 127.0.0.1 instead of unix sockets.
func WithTCP() StartOption { return func(c *startConfig) { c.tcp = true } }

// WithTCPAddr serves the data channel on addr ("127.0.0.1:2321") and the
// control channel on the next port, the convention of tpm2-tools' swtpm TCTI.
func WithTCPAddr(addr string) StartOption {
	return func(c *startConfig) { c.tcp, c.tcpAddr = true, addr }
}

// WithSocketPath serves the data channel on the unix socket path and the
// control channel on path + ".ctrl". By default both live in a fresh
// temporary directory removed by Stop.
func WithSocketPath(path string) StartOption {
	return func(c *startConfig) { c.socketPath = path }
}

// Start runs swtpm on state with --flags not-need-init,startup-clear and
// returns once the data channel accepts connections.
func Start(ctx context.Context, state *State, opts ...StartOption) (*SWTPM, error) {
	var cfg startConfig
	for _, o := range opts {
		o(&cfg)
	}
	bin, err := lookTool(swtpmBin)
	if err != nil {
		return nil, err
	}
	if state == nil || state.Dir == "" {
		return nil, errors.New("starting swtpm: no TPM state")
	}
	// A port picked by listening on :0 can be taken again before swtpm binds
	// it; retry with new ports in that case.
	attempts := 1
	if cfg.tcp && cfg.tcpAddr == "" {
		attempts = 3
	}
	var lastErr error
	for i := 0; i < attempts; i++ {
		s, err := start(ctx, bin, state, cfg)
		if err == nil {
			return s, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

func start(ctx context.Context, bin string, state *State, cfg startConfig) (*SWTPM, error) {
	s := &SWTPM{state: state, done: make(chan struct{}), output: &boundedBuffer{max: 8 << 10}}
	var server, ctrl string
	switch {
	case cfg.tcp:
		host, dataPort, ctrlPort, err := tcpPorts(cfg.tcpAddr)
		if err != nil {
			return nil, err
		}
		s.network = "tcp"
		s.dataAddr = net.JoinHostPort(host, strconv.Itoa(dataPort))
		s.ctrlAddr = net.JoinHostPort(host, strconv.Itoa(ctrlPort))
		server = fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", dataPort, host)
		ctrl = fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", ctrlPort, host)
	default:
		s.network = "unix"
		path := cfg.socketPath
		if path == "" {
			// Unix socket paths are limited to 108 bytes: t.TempDir() paths
			// can be longer, so sockets get a short directory of their own.
			dir, err := os.MkdirTemp("", "swtpm-")
			if err != nil {
				return nil, fmt.Errorf("creating swtpm socket directory: %w", err)
			}
			s.tmpDir = dir
			path = filepath.Join(dir, "swtpm.sock")
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			return nil, fmt.Errorf("resolving socket path: %w", err)
		}
		s.dataAddr, s.ctrlAddr = abs, abs+".ctrl"
		for _, p := range []string{s.dataAddr, s.ctrlAddr} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				s.cleanupTmp()
				return nil, fmt.Errorf("removing stale socket: %w", err)
			}
		}
		server = "type=unixio,path=" + s.dataAddr
		ctrl = "type=unixio,path=" + s.ctrlAddr
	}
	// Not CommandContext: ctx bounds the start, not the process's life.
	s.cmd = exec.Command(bin, "socket", "--tpm2",
		"--tpmstate", "dir="+state.Dir,
		"--server", server, "--ctrl", ctrl,
		"--flags", "not-need-init,startup-clear")
	s.cmd.Stdout, s.cmd.Stderr = s.output, s.output
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Pdeathsig fires when the OS thread that forked the child exits, not
	// the process: fork from a goroutine locked to its thread and keep it
	// there until swtpm exits, so the runtime cannot retire that thread.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := s.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = s.cmd.Wait()
		close(s.done)
	}()
	if err := <-started; err != nil {
		s.cleanupTmp()
		return nil, fmt.Errorf("starting swtpm: %w", err)
	}
	if err := s.waitReady(ctx); err != nil {
		_ = s.Stop()
		return nil, err
	}
	return s, nil
}

// tcpPorts returns the host and the data and control ports: from addr, or
// two free ports of 127.0.0.1.
func tcpPorts(addr string) (string, int, int, error) {
	if addr != "" {
		host, p, err := net.SplitHostPort(addr)
		if err != nil {
			return "", 0, 0, fmt.Errorf("parsing TCP address %q: %w", addr, err)
		}
		port, err := strconv.Atoi(p)
		if err != nil || port <= 0 || port >= 65535 {
			return "", 0, 0, fmt.Errorf("parsing TCP address %q: bad port", addr)
		}
		return host, port, port + 1, nil
	}
	var ports [2]int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", 0, 0, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return "127.0.0.1", ports[0], ports[1], nil
}

// waitReady waits until swtpm answers a TPM command. A listening socket is
// not enough: swtpm listens before it locks and loads its state, and exits
// if that fails (e.g. another swtpm runs on the same state).
func (s *SWTPM) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		select {
		case <-s.done:
			return fmt.Errorf("swtpm exited during start-up: %s", lastLines(s.output.String(), 5))
		default:
		}
		attempt, cancelAttempt := context.WithTimeout(ctx, 2*time.Second)
		rc, err := s.dataCommand(attempt, cmdReadClock)
		cancelAttempt()
		if err == nil {
			if rc != rcSuccess {
				return fmt.Errorf("swtpm not operational: TPM2_ReadClock returned 0x%x", rc)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for swtpm to answer on %s: %w", s.dataAddr, ctx.Err())
		case <-s.done:
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Address returns the TPM address of the data channel, as package tpm opens
// it: "unix:///abs/path" or "tcp://127.0.0.1:port".
func (s *SWTPM) Address() string { return s.network + "://" + s.dataAddr }

// ControlAddress returns the control channel (swtpm_ioctl protocol) in the
// same form as Address.
func (s *SWTPM) ControlAddress() string { return s.network + "://" + s.ctrlAddr }

// State returns the state directory swtpm serves.
func (s *SWTPM) State() *State { return s.state }

// PID returns the swtpm process id.
func (s *SWTPM) PID() int { return s.cmd.Process.Pid }

// Stop terminates swtpm (SIGTERM, then SIGKILL after 5 s) and waits for it.
// It is safe to call more than once.
func (s *SWTPM) Stop() error {
	s.stopOnce.Do(func() {
		defer s.cleanupTmp()
		select {
		case <-s.done:
			return
		default:
		}
		// Negative pid: the whole process group, set up by Setpgid.
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.done
			s.stopErr = errors.New("stopping swtpm: killed after SIGTERM timed out")
		}
	})
	return s.stopErr
}

func (s *SWTPM) cleanupTmp() {
	if s.tmpDir != "" {
		_ = os.RemoveAll(s.tmpDir)
	}
}

// TPM 2.0 commands the harness sends itself, hand-encoded so the simulator
// does not depend on the tpm package (whose tests use the simulator).
const (
	cmdShutdownClear = "\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x45\x00\x00"
	cmdStartupClear  = "\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x44\x00\x00"
	cmdReadClock     = "\x80\x01\x00\x00\x00\x0a\x00\x00\x01\x81"
)

const (
	rcSuccess    = 0x000
	rcInitialize = 0x100 // TPM_RC_INITIALIZE: Startup already done
	ctrlCmdInit  = 2     // swtpm ioctl CMD_INIT
)

// Reboot simulates a clean reboot: TPM2_Shutdown(CLEAR), a hardware init on
// the control channel, TPM2_Startup(CLEAR). resetCount goes up, the clock
// stays safe, PCRs are reset. A client holding a data connection sees it
// closed and must reconnect.
func (s *SWTPM) Reboot(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rc, err := s.dataCommand(ctx, cmdShutdownClear); err != nil {
		return fmt.Errorf("rebooting TPM: Shutdown: %w", err)
	} else if rc != rcSuccess {
		return fmt.Errorf("rebooting TPM: Shutdown returned 0x%x", rc)
	}
	return s.initAndStartup(ctx)
}

// PowerLoss simulates an unclean reboot (power cut): a hardware init without
// TPM2_Shutdown, then TPM2_Startup(CLEAR). resetCount goes up and the TPM
// reports its clock as not safe.
func (s *SWTPM) PowerLoss(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.initAndStartup(ctx)
}

func (s *SWTPM) initAndStartup(ctx context.Context) error {
	if err := s.ctrlInit(ctx); err != nil {
		return fmt.Errorf("rebooting TPM: init: %w", err)
	}
	rc, err := s.dataCommand(ctx, cmdStartupClear)
	if err != nil {
		return fmt.Errorf("rebooting TPM: Startup: %w", err)
	}
	if rc != rcSuccess && rc != rcInitialize {
		return fmt.Errorf("rebooting TPM: Startup returned 0x%x", rc)
	}
	return nil
}

func (s *SWTPM) dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	var c net.Conn
	// swtpm serves one data connection at a time; a unix connect fails
	// with EAGAIN while its short backlog is full, so wait for the other
	// client's turn to end.
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		var err error
		c, err = d.DialContext(ctx, s.network, addr)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EAGAIN) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	}
	return c, nil
}

// dataCommand sends one TPM command on a fresh data connection and returns
// the response code.
func (s *SWTPM) dataCommand(ctx context.Context, cmd string) (uint32, error) {
	c, err := s.dial(ctx, s.dataAddr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := io.WriteString(c, cmd); err != nil {
		return 0, err
	}
	var hdr [10]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return 0, fmt.Errorf("reading response: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > 1<<16 {
		return 0, fmt.Errorf("bad response size %d", size)
	}
	if _, err := io.CopyN(io.Discard, c, int64(size-10)); err != nil {
		return 0, fmt.Errorf("reading response: %w", err)
	}
	return binary.BigEndian.Uint32(hdr[6:10]), nil
}

// ctrlInit sends CMD_INIT (what `swtpm_ioctl -i` does): the TPM restarts
// as after a power cycle, keeping its non-volatile state.
func (s *SWTPM) ctrlInit(ctx context.Context) error {
	c, err := s.dial(ctx, s.ctrlAddr)
	if err != nil {
		return err
	}
	defer c.Close()
	var req [8]byte // command code, then init flags (none)
	binary.BigEndian.PutUint32(req[:4], ctrlCmdInit)
	if _, err := c.Write(req[:]); err != nil {
		return err
	}
	var resp [4]byte
	if _, err := io.ReadFull(c, resp[:]); err != nil {
		return fmt.Errorf("reading control response: %w", err)
	}
	if rc := binary.BigEndian.Uint32(resp[:]); rc != 0 {
		return fmt.Errorf("CMD_INIT returned 0x%x", rc)
	}
	return nil
}

// boundedBuffer keeps the last max bytes of swtpm's output for error
// messages; the process writes it from another goroutine.
type boundedBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b = append(b.b, p...)
	if len(b.b) > b.max {
		b.b = append([]byte(nil), b.b[len(b.b)-b.max:]...)
	}
	return len(p), nil
}

func (b *boundedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.b)
}
