package agent

// The harness of the agent runtime's integration tests: a real
// ironroot-server in-process (SoftHSM token, SQLite, TLS) trusting the
// suite's EK CA, agents on swtpm clones, and workloads using go-spiffe's
// Workload API client over the agent's unix socket.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffewl "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/ironroot/ironroot/agent/config"
	"github.com/ironroot/ironroot/server"
	sconfig "github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// deadline bounds every wait for an outcome. It is generous on purpose:
// these tests assert what happens, benchmarks measure how fast.
const deadline = 60 * time.Second

// pollEvery is how often a waiting test looks again.
const pollEvery = 100 * time.Millisecond

// lockedBuffer collects a component's log; slog handlers write to it from
// several goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newTestLogger returns a debug logger writing into a buffer that the test
// prints if it fails.
func newTestLogger(t testing.TB, name string) (*slog.Logger, *lockedBuffer) {
	buf := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("AGENT_TEST_LOGS") != "" {
			t.Logf("%s log:\n%s", name, buf)
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

// testServer is one ironroot-server; its configuration (with the port it
// first bound), token and data directory survive a restart.
type testServer struct {
	t          testing.TB
	cfg        *sconfig.Config
	srv        *server.Server
	log        *slog.Logger
	stopFn     func()
	bundlePath string
}

// newServer starts a server trusting the suite's EK CA (root and
// intermediate in an EK root directory, as an operator installs them) and
// writes its X.509 bundle to a PEM file for the agent's -trustBundle. mod
// adjusts the configuration first.
func newServer(t testing.TB, mod func(*sconfig.Config)) *testServer {
	t.Helper()
	tok := simtest.SoftHSMToken(t, softHSM)
	dir := t.TempDir()
	sockDir := shortTempDir(t, "irs-")
	roots := filepath.Join(dir, "ek-roots")
	if err := os.MkdirAll(roots, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{suite.CA.RootPath(), suite.CA.IntermediatePath()} {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(roots, filepath.Base(p)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := &sconfig.Config{
		TrustDomain:        td,
		BindAddress:        "127.0.0.1",
		ServerPort:         0,
		SocketPath:         filepath.Join(sockDir, "private", "api.sock"),
		DataDir:            filepath.Join(dir, "data"),
		LogLevel:           "debug",
		LogFormat:          "text",
		CATTL:              24 * time.Hour,
		DefaultX509SVIDTTL: time.Hour,
		DefaultJWTSVIDTTL:  5 * time.Minute,
		AgentTTL:           time.Hour,
		CAKeyType:          "ec-p256",
		JWTKeyType:         "ec-p256",
		HSM:                tok.URI,
		NodeAttestation:    sconfig.TPMPolicy{EKRootDir: roots, PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}},
		// Renewal and eviction re-attest from the same address; the
		// limiter must not get in the way.
		AttestRatePerIP: 1e6,
	}
	if mod != nil {
		mod(cfg)
	}
	log, _ := newTestLogger(t, "server")
	s := &testServer{t: t, cfg: cfg, log: log}
	if err := s.start(); err != nil {
		t.Fatalf("starting server: %v", err)
	}
	t.Cleanup(s.stop)
	s.bundlePath = filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(s.bundlePath, pemCerts(s.srv.CA().Bundle().X509Authorities), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// shortTempDir is a temporary directory for unix sockets, whose paths are
// limited to 108 bytes (t.TempDir can be longer).
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// start runs server.New and Run in the background. After the first start
// the port is fixed, so a restarted server is where the agent expects it.
func (s *testServer) start() error {
	srv, err := server.New(context.Background(), s.cfg, s.log)
	if err != nil {
		return err
	}
	if s.cfg.ServerPort == 0 {
		s.cfg.ServerPort = srv.Addr().(*net.TCPAddr).Port
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	var once sync.Once
	s.srv = srv
	s.stopFn = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				s.t.Errorf("server Run: %v", err)
			}
			srv.Close()
		})
	}
	return nil
}

// stop stops the server (idempotent).
func (s *testServer) stop() {
	if s.stopFn != nil {
		s.stopFn()
	}
}

// restart stops the server and starts a new one on the same port, data
// directory and token.
func (s *testServer) restart() {
	s.t.Helper()
	s.stop()
	if err := s.start(); err != nil {
		s.t.Fatalf("restarting server: %v", err)
	}
}

func (s *testServer) address() string {
	return net.JoinHostPort(s.cfg.BindAddress, fmt.Sprint(s.cfg.ServerPort))
}

// x509Bundle is the server's current X.509 bundle, straight from its CA:
// workload SVIDs are verified against it, not against what the agent says.
func (s *testServer) x509Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, s.srv.CA().Bundle().X509Authorities)
}

// node returns the node record of id (nil when there is none).
func (s *testServer) node(id spiffeid.ID) *store.Node {
	s.t.Helper()
	n, err := s.srv.Store().GetNode(context.Background(), id.String())
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		s.t.Fatalf("reading node %s: %v", id, err)
	}
	return n
}

// createEntry registers a workload entry for the test process's uid under
// the agent.
func (s *testServer) createEntry(spiffeID string, parent spiffeid.ID) *store.Entry {
	s.t.Helper()
	e, err := s.srv.Store().CreateEntry(context.Background(), &store.Entry{
		SPIFFEID:  spiffeID,
		ParentID:  parent.String(),
		Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}},
	})
	if err != nil {
		s.t.Fatalf("creating entry %s: %v", spiffeID, err)
	}
	return e
}

// agentConfig is the configuration of an agent on sw talking to s, with
// its socket in a short temporary directory.
func agentConfig(t testing.TB, s *testServer, sw *simulator.SWTPM) *config.Config {
	t.Helper()
	return &config.Config{
		ServerAddress:   s.address(),
		TPM:             sw.Address(),
		SocketPath:      filepath.Join(shortTempDir(t, "iag-"), "api.sock"),
		DataDir:         filepath.Join(t.TempDir(), "agent-data"),
		TrustDomain:     td,
		TrustBundlePath: s.bundlePath,
		LogLevel:        "debug",
		LogFormat:       "text",
	}
}

// testAgent is one running agent.
type testAgent struct {
	t      testing.TB
	cfg    *config.Config
	a      *Agent
	logs   *lockedBuffer
	stopFn func()
}

// startAgent runs New and, in the background, Run; the agent is stopped
// when the test ends.
func startAgent(t testing.TB, cfg *config.Config) *testAgent {
	t.Helper()
	log, logs := newTestLogger(t, "agent")
	a, err := New(context.Background(), cfg, log)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	ta := &testAgent{t: t, cfg: cfg, a: a, logs: logs}
	var once sync.Once
	ta.stopFn = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("agent Run: %v", err)
			}
			a.Close()
		})
	}
	t.Cleanup(ta.stopFn)
	return ta
}

// stop stops the agent and releases its TPM connection (idempotent).
func (ta *testAgent) stop() { ta.stopFn() }

// svid is the agent's current SVID (nil before the first attestation).
func (ta *testAgent) svid() *x509svid.SVID { return ta.a.id.current() }

// waitAttested waits until the agent holds an SVID.
func (ta *testAgent) waitAttested() *x509svid.SVID {
	ta.t.Helper()
	var s *x509svid.SVID
	waitFor(ta.t, "the agent to attest", func() bool { s = ta.svid(); return s != nil })
	return s
}

// serial is the agent's current SVID serial ("" before attestation).
func (ta *testAgent) serial() string {
	if s := ta.svid(); s != nil {
		return s.Certificates[0].SerialNumber.String()
	}
	return ""
}

// waitFor polls cond until it holds, failing the test after deadline.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", deadline, what)
		}
		time.Sleep(pollEvery)
	}
}

// workload is a go-spiffe Workload API client of the agent's socket, as
// any SPIFFE workload uses it.
func workload(t testing.TB, ta *testAgent) *spiffewl.Client {
	t.Helper()
	c, err := spiffewl.New(context.Background(), spiffewl.WithAddr("unix://"+ta.cfg.SocketPath))
	if err != nil {
		t.Fatalf("Workload API client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// fetchX509 fetches the workload's X509 context once and checks every SVID
// in it against the server's bundle; it returns the SVIDs' IDs, sorted.
func fetchX509(s *testServer, c *spiffewl.Client) ([]string, error) {
	return fetchX509With(s.x509Bundle(), c)
}

// fetchX509With is fetchX509 against a given bundle.
func fetchX509With(bundle *x509bundle.Bundle, c *spiffewl.Client) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	x, err := c.FetchX509Context(ctx)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, svid := range x.SVIDs {
		if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
			return nil, fmt.Errorf("SVID %s does not verify against the server's bundle: %w", svid.ID, err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, x.Bundles); err != nil {
			return nil, fmt.Errorf("SVID %s does not verify against the bundle the agent served: %w", svid.ID, err)
		}
		if !time.Now().Before(svid.Certificates[0].NotAfter) {
			return nil, fmt.Errorf("SVID %s expired at %s", svid.ID, svid.Certificates[0].NotAfter)
		}
		ids = append(ids, svid.ID.String())
	}
	slices.Sort(ids)
	return ids, nil
}

// waitX509 waits until the workload's valid SVIDs are exactly want.
func waitX509(t testing.TB, s *testServer, c *spiffewl.Client, want ...string) {
	t.Helper()
	slices.Sort(want)
	var got []string
	var err error
	end := time.Now().Add(deadline)
	for {
		got, err = fetchX509(s, c)
		if err == nil && slices.Equal(got, want) {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("workload SVIDs: got %v (error %v), want %v", got, err, want)
		}
		time.Sleep(pollEvery)
	}
}

// logHas reports whether every part occurs in one line of the log.
func logHas(log string, parts ...string) bool {
	for line := range strings.Lines(log) {
		all := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				all = false
				break
			}
		}
		if all {
			return true
		}
	}
	return false
}

// waitHealth waits until the gRPC health service on the agent's Workload
// API socket (what `ironroot-agent healthcheck` asks) reports want.
func waitHealth(t testing.TB, ta *testAgent, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+ta.cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	var got healthpb.HealthCheckResponse_ServingStatus
	waitFor(t, "agent health "+want.String(), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil {
			got = resp.Status
		}
		return err == nil && got == want
	})
}
