package agentapi_test

// The harness of the Attest integration tests: a real ironroot-server
// (SoftHSM token, SQLite, TLS) in-process, and agents on swtpm running the
// agent's own attestation client (agent/attest) with package tpm.

import (
	"context"
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/ironroot/ironroot/agent/attest"
	"github.com/ironroot/ironroot/server"
	"github.com/ironroot/ironroot/server/agentapi"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
)

var (
	softHSM *simulator.SoftHSM
	// suite is the manufacturer the servers trust; other makes TPMs with
	// EK certificates from another private CA.
	suite, other *simtest.Suite
)

// TestMain sets up both simulators: swtpm suites (one manufacturing each)
// and one SoftHSM with a token for each server the tests and the benchmark
// start (13 today). A PKCS#11 module is initialised once per process, so
// servers run one at a time.
func TestMain(m *testing.M) {
	suite = simtest.MustSuite()
	other = simtest.MustSuite()
	code := simtest.RunWithSoftHSM(m, &softHSM, 16)
	suite.Close()
	other.Close()
	os.Exit(code)
}

var td = spiffeid.RequireTrustDomainFromString("example.org")

// env is one running server.
type env struct {
	t   testing.TB
	cfg *config.Config
	srv *server.Server
}

// newServer starts a server trusting the suite's EK CA (root and
// intermediate as files in an EK root directory, as an operator installs
// them), quoting PCRs 0–7; mod adjusts the configuration.
func newServer(t testing.TB, mod func(cfg *config.Config, dir string)) *env {
	t.Helper()
	tok := simtest.SoftHSMToken(t, softHSM)
	dir := t.TempDir()
	// Unix socket paths are limited to 108 bytes; test temp dirs can be
	// longer.
	sockDir, err := os.MkdirTemp("", "ira-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
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
	cfg := &config.Config{
		TrustDomain:        td,
		BindAddress:        "127.0.0.1",
		ServerPort:         0,
		SocketPath:         filepath.Join(sockDir, "private", "api.sock"),
		DataDir:            filepath.Join(dir, "data"),
		LogLevel:           "info",
		LogFormat:          "text",
		CATTL:              24 * time.Hour,
		DefaultX509SVIDTTL: time.Hour,
		DefaultJWTSVIDTTL:  5 * time.Minute,
		AgentTTL:           time.Hour,
		CAKeyType:          "ec-p256",
		JWTKeyType:         "ec-p256",
		HSM:                tok.URI,
		NodeAttestation:    config.TPMPolicy{EKRootDir: roots, PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}},
		// The limiter's burst is 2: a rate this high refills it between
		// any two attempts. The rate-limit test lowers it.
		AttestRatePerIP: 1e6,
	}
	if mod != nil {
		mod(cfg, dir)
	}
	srv, err := server.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("starting server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server Run: %v", err)
		}
		srv.Close()
	})
	return &env{t: t, cfg: cfg, srv: srv}
}

func (e *env) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, e.srv.CA().Bundle().X509Authorities)
}

// dial connects to the agent API without a client certificate, as an
// agent that has not attested yet, authenticating the server by its ID.
func (e *env) dial() agentv1.AgentClient {
	e.t.Helper()
	conf := tlsconfig.TLSClientConfig(e.bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, agentapi.ServerPath)))
	conf.MinVersion = tls.VersionTLS12
	conn, err := grpc.NewClient(e.srv.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return agentv1.NewAgentClient(conn)
}

// nodes lists every node record.
func (e *env) nodes() []*store.Node {
	e.t.Helper()
	ns, _, err := e.srv.Store().ListNodes(context.Background(), store.ListNodesRequest{})
	if err != nil {
		e.t.Fatalf("listing nodes: %v", err)
	}
	return ns
}

// node returns the record of id, failing the test when there is none.
func (e *env) node(id string) *store.Node {
	e.t.Helper()
	n, err := e.srv.Store().GetNode(context.Background(), id)
	if err != nil {
		e.t.Fatalf("node %s: %v", id, err)
	}
	return n
}

// agentNode is a host with a TPM.
type agentNode struct {
	t   testing.TB
	sw  *simulator.SWTPM
	tpm *tpm.TPM
	ek  string // the RSA EK's hash, which names the agent
}

func startNode(t testing.TB, s *simtest.Suite) *agentNode {
	t.Helper()
	n := &agentNode{t: t, sw: s.Start(t)}
	n.open()
	return n
}

// open connects to the node's TPM (swtpm serves one connection at a time).
func (n *agentNode) open(opts ...tpm.Option) {
	n.t.Helper()
	tp, err := tpm.Open(context.Background(), n.sw.Address(), opts...)
	if err != nil {
		n.t.Fatalf("opening %s: %v", n.sw.Address(), err)
	}
	n.t.Cleanup(func() { tp.Close() })
	eks, err := tp.EndorsementKeys(context.Background())
	if err != nil {
		n.t.Fatalf("EndorsementKeys: %v", err)
	}
	ek, err := attest.ChooseEK(eks, "")
	if err != nil {
		n.t.Fatal(err)
	}
	if n.ek, err = ek.Hash(); err != nil {
		n.t.Fatal(err)
	}
	n.tpm = tp
}

func (n *agentNode) agentID() string {
	return "spiffe://example.org/ironroot/agent/tpm/" + n.ek
}

// attest runs the agent's attestation client; the TPM key it returns is
// released when the test ends.
func (n *agentNode) attest(client agentv1.AgentClient) (*attest.Result, error) {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := attest.Attest(ctx, client, n.tpm)
	if err == nil {
		n.t.Cleanup(func() { res.Key.Close() })
	}
	return res, err
}

// extend extends SHA-256 PCRs, as boot components would, over a
// connection of its own: the agent's TPM connection is closed first and
// reopened after (with opts).
func (n *agentNode) extend(events []simulator.LogEvent, opts ...tpm.Option) {
	n.t.Helper()
	n.tpm.Close()
	path, ok := strings.CutPrefix(n.sw.Address(), "unix://")
	if !ok {
		n.t.Fatalf("extend needs a unix socket, got %s", n.sw.Address())
	}
	tr, err := linuxudstpm.Open(path)
	if err != nil {
		n.t.Fatalf("opening %s: %v", path, err)
	}
	for _, e := range events {
		_, err = tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(e.PCR), Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: e.Digest}}},
		}.Execute(tr)
		if err != nil {
			break
		}
	}
	tr.Close()
	if err != nil {
		n.t.Fatalf("PCR_Extend: %v", err)
	}
	n.open(opts...)
}

// tamperClient runs the agent's client through hooks that change what it
// sends and receives, as a compromised agent or a man in the middle would.
type tamperClient struct {
	agentv1.AgentClient
	send func(*agentv1.AttestRequest)
	recv func(*agentv1.AttestResponse)
}

func (c tamperClient) Attest(ctx context.Context, opts ...grpc.CallOption) (agentv1.Agent_AttestClient, error) {
	s, err := c.AgentClient.Attest(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &tamperStream{Agent_AttestClient: s, c: c}, nil
}

type tamperStream struct {
	agentv1.Agent_AttestClient
	c tamperClient
}

func (s *tamperStream) Send(r *agentv1.AttestRequest) error {
	if s.c.send != nil {
		s.c.send(r)
	}
	return s.Agent_AttestClient.Send(r)
}

func (s *tamperStream) Recv() (*agentv1.AttestResponse, error) {
	r, err := s.Agent_AttestClient.Recv()
	if err == nil && s.c.recv != nil {
		s.c.recv(r)
	}
	return r, err
}
