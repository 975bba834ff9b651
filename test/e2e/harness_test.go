package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
)

// Binary names, as built from ./cmd/<name>.
const (
	serverBin = "ironroot-server"
	agentBin  = "ironroot-agent"
	simBin    = "ironroot-sim"
)

// Hang guards: how long a process may take to become ready, and a CLI call
// to return. They fail a wedged test instead of hanging it; they are not
// speed checks.
const (
	readyTimeout = 60 * time.Second
	cliTimeout   = 30 * time.Second
	stopTimeout  = 10 * time.Second
)

// trustDomain is the trust domain of every test.
const trustDomain = "example.org"

// env is what TestMain sets up once for the test binary.
type env struct {
	// bin holds the built binaries.
	bin string
	// suite is the swtpm manufacturer (private CA) and a pristine TPM.
	suite *simtest.Suite
	// ekRoots is a directory with the suite CA's root and intermediate PEMs.
	ekRoots string
}

var e2e env

func TestMain(m *testing.M) {
	code, err := setup(m)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(2)
	}
	os.Exit(code)
}

func setup(m *testing.M) (int, error) {
	dir, err := os.MkdirTemp("", "ironroot-e2e-")
	if err != nil {
		return 0, fmt.Errorf("creating the test directory: %w", err)
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	bin := filepath.Join(dir, "bin")
	if err := buildBinaries(ctx, bin); err != nil {
		return 0, err
	}
	suite, err := simtest.NewSuite(ctx)
	if err != nil {
		return 0, fmt.Errorf("setting up the swtpm suite (run `make deps`): %w", err)
	}
	defer suite.Close()
	roots := filepath.Join(dir, "ek-roots")
	if err := copyCAPEMs(suite.CA, roots); err != nil {
		return 0, err
	}
	e2e = env{bin: bin, suite: suite, ekRoots: roots}
	return m.Run(), nil
}

// buildBinaries builds the three commands into dir with the go tool that
// runs the tests (cgo on: the server's PKCS#11 needs it), with -race when the
// tests run with it.
func buildBinaries(ctx context.Context, dir string) error {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	root, err := moduleRoot(ctx, goTool)
	if err != nil {
		return err
	}
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if raceEnabled {
		args = append(args, "-race")
	}
	for _, b := range []string{serverBin, agentBin, simBin} {
		args = append(args, "./cmd/"+b)
	}
	cmd := exec.CommandContext(ctx, goTool, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building the binaries (go %s): %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func moduleRoot(ctx context.Context, goTool string) (string, error) {
	out, err := exec.CommandContext(ctx, goTool, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("finding the module root: not inside the ironroot module")
	}
	return filepath.Dir(mod), nil
}

// copyCAPEMs puts a swtpm CA's root and intermediate into dir, the server's
// node_attestation.tpm.ek_root_dir.
func copyCAPEMs(ca *simulator.CA, dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating the EK root directory: %w", err)
	}
	for name, src := range map[string]string{"root.pem": ca.RootPath(), "intermediate.pem": ca.IntermediatePath()} {
		b, err := os.ReadFile(src)
		if err != nil {
			return fmt.Errorf("reading %s: %w", src, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return fmt.Errorf("writing EK root %s: %w", name, err)
		}
	}
	return nil
}

// shortDir returns a fresh directory with a short path, removed when the
// test ends: unix socket paths are limited to 108 bytes, and t.TempDir()
// paths can be long.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// freePort returns a TCP port of 127.0.0.1 that was free a moment ago.
// Another process may take it before ours binds it; startServer retries.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// logBuffer collects a process's output for the test log, keeping the last
// max bytes.
type logBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b = append(l.b, p...)
	if over := len(l.b) - l.max; over > 0 {
		l.b = append(l.b[:0], l.b[over:]...)
	}
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.b)
}

// process is a running binary started by start.
type process struct {
	name   string
	bin    string
	args   []string
	env    []string
	cmd    *exec.Cmd
	stdout *logBuffer
	stderr *logBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // Wait's result, set before done closes
}

// start runs bin with args and extra environment. The process runs in its
// own process group and gets SIGKILL if the test binary dies; the test's
// cleanup stops the whole group (SIGTERM, then SIGKILL) and, if the test
// failed, logs the process's output.
func start(t testing.TB, name, bin string, args []string, extraEnv ...string) *process {
	t.Helper()
	p := &process{
		name:   name,
		bin:    bin,
		args:   args,
		env:    extraEnv,
		stdout: &logBuffer{max: 1 << 20},
		stderr: &logBuffer{max: 1 << 20},
		done:   make(chan struct{}),
	}
	p.cmd = exec.Command(filepath.Join(e2e.bin, bin), args...)
	p.cmd.Env = append(os.Environ(), extraEnv...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Pdeathsig fires when the forking OS thread exits, not the process:
	// fork from a goroutine locked to its thread and keep it there until
	// the child exits.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := p.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() {
		p.stop(t)
		// A race-enabled binary reports races on stderr and carries on.
		if raceEnabled && strings.Contains(p.stderr.String(), "WARNING: DATA RACE") {
			t.Errorf("%s had a data race", name)
		}
		if t.Failed() {
			t.Logf("%s %s exited: %v\n--- %s stderr ---\n%s--- %s stdout ---\n%s", name,
				strings.Join(args, " "), p.err, name, p.stderr.String(), name, p.stdout.String())
		}
	})
	return p
}

// restart stops the process and starts the same command again.
func (p *process) restart(t testing.TB) *process {
	t.Helper()
	p.stop(t)
	return start(t, p.name, p.bin, p.args, p.env...)
}

// exited reports whether the process has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process group: SIGTERM, SIGKILL after stopTimeout. It is
// safe to call more than once, and a no-op once the process has exited.
func (p *process) stop(t testing.TB) {
	if p.exited() {
		return
	}
	pgid := p.cmd.Process.Pid // the group was made with Setpgid: pgid = pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(stopTimeout):
		t.Errorf("%s ignored SIGTERM for %v; killing it", p.name, stopTimeout)
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
}

// run runs bin to completion with a hang guard and returns its exit code,
// stdout and stderr.
func run(t testing.TB, bin string, args []string, extraEnv ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(e2e.bin, bin), args...)
	cmd.Env = append(os.Environ(), extraEnv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
	case err != nil:
		t.Fatalf("running %s %s: %v", bin, strings.Join(args, " "), err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// waitFor polls cond every 100 ms until it holds, p exits (fatal, with its
// stderr), or readyTimeout passes (fatal).
func waitFor(t testing.TB, p *process, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		if cond() {
			return
		}
		if p != nil && p.exited() {
			t.Fatalf("%s exited (%v) while waiting for %s; stderr:\n%s", p.name, p.err, what, p.stderr.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, readyTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// server is a running ironroot-server.
type server struct {
	*process
	// dir holds the configuration, the store and the admin socket.
	dir string
	// address is the agent API, 127.0.0.1:port.
	address string
	// socketPath is the admin API socket.
	socketPath string
	// configPath is the server.hcl it runs with.
	configPath string
	// hsmEnv is SOFTHSM2_CONF=..., which every server process needs.
	hsmEnv string
	// hsmURI is the token's pkcs11: URI (pin-source file, no PIN).
	hsmURI string
}

type serverConfig struct {
	ekRootDir  string
	serverKeys string
}

// serverOption configures startServer.
type serverOption func(*serverConfig)

// withServerKeys adds keys (HCL lines) to the server block, e.g. TTLs.
func withServerKeys(hcl string) serverOption { return func(c *serverConfig) { c.serverKeys = hcl } }

// startServer makes a SoftHSM token, writes server.hcl (trusting the
// suite's swtpm CA by default) and runs `ironroot-server run -config` until
// its healthcheck passes.
func startServer(t testing.TB, opts ...serverOption) *server {
	t.Helper()
	cfg := serverConfig{ekRootDir: e2e.ekRoots}
	for _, o := range opts {
		o(&cfg)
	}
	dir := shortDir(t)
	soft, err := simulator.NewSoftHSM(filepath.Join(dir, "softhsm"))
	if err != nil {
		t.Fatalf("setting up SoftHSM: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	tok, err := soft.InitToken(ctx, "e2e-server", "")
	if err != nil {
		t.Fatalf("initialising the server's token: %v", err)
	}
	s := &server{
		dir:        dir,
		socketPath: filepath.Join(dir, "admin", "api.sock"),
		configPath: filepath.Join(dir, "server.hcl"),
		hsmEnv:     soft.Env(),
		hsmURI:     tok.URI,
	}
	// A port picked free can be taken before the server binds it: retry.
	for attempt := 1; ; attempt++ {
		port := freePort(t)
		s.address = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		hcl := fmt.Sprintf(`server {
  trust_domain = %q
  bind_address = "127.0.0.1"
  bind_port    = %d
  socket_path  = %q
  data_dir     = %q
  log_level    = "debug"
  hsm          = %q
%s
}

node_attestation {
  tpm {
    ek_root_dir = %q
  }
}
`, trustDomain, port, s.socketPath, filepath.Join(dir, "data"), tok.URI, cfg.serverKeys, cfg.ekRootDir)
		if err := os.WriteFile(s.configPath, []byte(hcl), 0o600); err != nil {
			t.Fatal(err)
		}
		s.process = start(t, "ironroot-server", serverBin, []string{"run", "-config", s.configPath}, s.hsmEnv)
		ok := s.waitHealthy(t)
		if ok {
			return s
		}
		if attempt == 3 || !strings.Contains(s.stderr.String(), "address already in use") {
			t.Fatalf("ironroot-server exited during start-up (%v); stderr:\n%s", s.err, s.stderr.String())
		}
	}
}

// waitHealthy polls `ironroot-server healthcheck` until it passes (true) or
// the server exits (false).
func (s *server) waitHealthy(t testing.TB) bool {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for time.Now().Before(deadline) {
		if code, _, _ := run(t, serverBin, []string{"healthcheck", "-socketPath", s.socketPath}); code == 0 {
			return true
		}
		if s.exited() {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("ironroot-server not healthy within %v; stderr:\n%s", readyTimeout, s.stderr.String())
	return false
}

// restart stops the server (SIGTERM) and starts it again on the same
// configuration, store and token, then waits until it is healthy.
func (s *server) restart(t testing.TB) {
	t.Helper()
	s.process = s.process.restart(t)
	if !s.waitHealthy(t) {
		t.Fatalf("ironroot-server exited after a restart (%v); stderr:\n%s", s.err, s.stderr.String())
	}
}

// cli runs an admin command (`ironroot-server <args> -socketPath ...`) and
// returns its stdout; a non-zero exit fails the test.
func (s *server) cli(t testing.TB, args ...string) string {
	t.Helper()
	code, stdout, stderr := s.tryCLI(t, args...)
	if code != 0 {
		t.Fatalf("ironroot-server %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, stdout, stderr)
	}
	return stdout
}

// tryCLI is cli that returns the exit code and both outputs.
func (s *server) tryCLI(t testing.TB, args ...string) (int, string, string) {
	t.Helper()
	// Subcommand words first, then flags: the admin commands parse flags
	// after their subcommand.
	args = append(append([]string(nil), args...), "-socketPath", s.socketPath)
	return run(t, serverBin, args, s.hsmEnv)
}

// bundle runs `bundle show` and writes the PEM bundle to a file for agents.
func (s *server) bundle(t testing.TB) string {
	t.Helper()
	pemBundle := s.cli(t, "bundle", "show")
	path := filepath.Join(s.dir, "bundle.pem")
	if err := os.WriteFile(path, []byte(pemBundle), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// agentID is the SPIFFE ID an agent on a TPM with this EK gets.
func agentID(t testing.TB, ek tpm.EK) string {
	t.Helper()
	h, err := ek.Hash()
	if err != nil {
		t.Fatal(err)
	}
	return "spiffe://" + trustDomain + "/ironroot/agent/tpm/" + h
}

// readEKs opens the TPM, reads its EKs and closes it again (swtpm serves one
// connection at a time, so do it before the agent starts).
func readEKs(t testing.TB, sw *simulator.SWTPM) []tpm.EK {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	tp, err := tpm.Open(ctx, sw.Address())
	if err != nil {
		t.Fatalf("opening %s: %v", sw.Address(), err)
	}
	defer tp.Close()
	eks, err := tp.EndorsementKeys(ctx)
	if err != nil {
		t.Fatalf("reading EKs: %v", err)
	}
	return eks
}

// agent is a running ironroot-agent.
type agent struct {
	*process
	// socketPath is the Workload API socket.
	socketPath string
	// dataDir is the agent's data directory.
	dataDir string
}

// startAgent runs `ironroot-agent run` against srv on the TPM at sw, with
// the server's bundle as its trust bundle. It does not wait: see
// waitServing.
func startAgent(t testing.TB, srv *server, sw *simulator.SWTPM, bundlePath string) *agent {
	t.Helper()
	dir := shortDir(t)
	a := &agent{socketPath: filepath.Join(dir, "api.sock"), dataDir: filepath.Join(dir, "data")}
	a.process = start(t, "ironroot-agent", agentBin, []string{"run",
		"-serverAddress", srv.address,
		"-tpm", sw.Address(),
		"-trustBundle", bundlePath,
		"-socketPath", a.socketPath,
		"-dataDir", a.dataDir,
		"-trustDomain", trustDomain,
		"-logLevel", "debug",
	})
	return a
}

// restart stops the agent (SIGTERM) and starts it again with the same
// flags and data directory; it does not wait (see waitServing).
func (a *agent) restart(t testing.TB) {
	t.Helper()
	a.process = a.process.restart(t)
}

// waitServing waits until the agent's Workload API answers its healthcheck
// (it serves only once attested).
func (a *agent) waitServing(t testing.TB) {
	t.Helper()
	waitFor(t, a.process, "the agent's Workload API", func() bool {
		code, _, _ := run(t, agentBin, []string{"healthcheck", "-socketPath", a.socketPath})
		return code == 0
	})
}
