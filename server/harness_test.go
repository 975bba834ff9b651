package server_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/ironroot/ironroot/server"
	"github.com/ironroot/ironroot/server/agentapi"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/cli"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var softHSM *simulator.SoftHSM

// A PKCS#11 module is initialised once per process, so the tests of this
// package run one server at a time (no t.Parallel) and each takes a token.
func TestMain(m *testing.M) { os.Exit(simtest.RunWithSoftHSM(m, &softHSM, 16)) }

var td = spiffeid.RequireTrustDomainFromString("example.org")

// env is one server under test: its configuration, token and data
// directory survive a restart.
type env struct {
	t     testing.TB
	cfg   *config.Config
	token *simulator.SoftHSMToken
	srv   *server.Server
	stop  func()
}

// newEnv starts a server on a fresh token and data directory; opts adjust
// the configuration first.
func newEnv(t testing.TB, opts ...func(*config.Config)) *env {
	t.Helper()
	tok := simtest.SoftHSMToken(t, softHSM)
	dir := t.TempDir()
	// Unix socket paths are limited to 108 bytes; test temp dirs can be
	// longer.
	sockDir, err := os.MkdirTemp("", "irs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
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
		NodeAttestation:    config.TPMPolicy{EKRootDir: ekRootDir(t, dir), PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}},
		AttestRatePerIP:    1,
	}
	for _, o := range opts {
		o(cfg)
	}
	e := &env{t: t, cfg: cfg, token: tok}
	if err := e.start(); err != nil {
		t.Fatalf("starting server: %v", err)
	}
	t.Cleanup(func() { e.shutdown() })
	return e
}

// ekRootDir writes a self-signed certificate standing in for a TPM
// manufacturer root: these tests make node records directly.
func ekRootDir(t testing.TB, dir string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test EK root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "ek-roots")
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "root.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return root
}

// start runs server.New and Run in the background.
func (e *env) start() error {
	s, err := server.New(context.Background(), e.cfg, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	e.srv = s
	e.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("server Run: %v", err)
			}
			s.Close()
		})
	}
	return nil
}

// shutdown stops the server (idempotent).
func (e *env) shutdown() {
	if e.stop != nil {
		e.stop()
	}
}

// restart stops the server and starts a new one on the same data
// directory and token.
func (e *env) restart() error {
	e.shutdown()
	return e.start()
}

// cli runs an admin command against the server's socket.
func (e *env) cli(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	c := &cli.CLI{Stdout: &out, Stderr: &errb}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	full := append(append([]string(nil), args...), "-socketPath", e.cfg.SocketPath)
	code = c.Main(ctx, full)
	return code, out.String(), errb.String()
}

// mustCLI runs an admin command that must succeed.
func (e *env) mustCLI(args ...string) string {
	e.t.Helper()
	code, out, errOut := e.cli(args...)
	if code != 0 {
		e.t.Fatalf("ironroot-server %v: exit %d: %s", args, code, errOut)
	}
	return out
}

// createEntry creates one entry through the CLI and returns it.
func (e *env) createEntry(args ...string) *agentv1.Entry {
	e.t.Helper()
	out := e.mustCLI(append([]string{"entry", "create", "-output", "json"}, args...)...)
	var resp struct {
		Entries []struct {
			ID       string `json:"id"`
			SPIFFEID string `json:"spiffe_id"`
			ParentID string `json:"parent_id"`
			Revision string `json:"revision_number"`
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil || len(resp.Entries) != 1 {
		e.t.Fatalf("entry create output %q: %v", out, err)
	}
	r := resp.Entries[0]
	return &agentv1.Entry{Id: r.ID, SpiffeId: r.SPIFFEID, ParentId: r.ParentID}
}

// agent is a node record and an agent X509-SVID for it, signed by the
// server's CA for a software key (these tests do not attest).
type agent struct {
	id   spiffeid.ID
	svid *x509svid.SVID
	node *store.Node
}

func (e *env) newAgent(selectors ...store.Selector) *agent {
	e.t.Helper()
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		e.t.Fatal(err)
	}
	ekHash := hex.EncodeToString(raw)
	id, err := agentapi.AgentID(td, ekHash)
	if err != nil {
		e.t.Fatal(err)
	}
	a := &agent{id: id}
	a.svid = e.signAgentSVID(id)
	node, err := e.srv.Store().UpsertNode(context.Background(), &store.Node{
		SPIFFEID:     id.String(),
		EKHash:       ekHash,
		Selectors:    append([]store.Selector{{Type: "tpm", Value: "ek_hash:" + ekHash}}, selectors...),
		Evidence:     []byte(`{"manufacturer":"id:53574D20","secure_boot":"enabled"}`),
		CertSerial:   a.svid.Certificates[0].SerialNumber.String(),
		CertNotAfter: a.svid.Certificates[0].NotAfter,
	})
	if err != nil {
		e.t.Fatalf("storing node: %v", err)
	}
	a.node = node
	return a
}

func (e *env) signAgentSVID(id spiffeid.ID) *x509svid.SVID {
	e.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		e.t.Fatal(err)
	}
	chain, err := e.srv.CA().SignX509SVID(ca.SVIDParams{ID: id, PublicKey: key.Public(), NotBefore: time.Now(), TTL: time.Hour})
	if err != nil {
		e.t.Fatalf("signing agent SVID: %v", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

func (e *env) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, e.srv.CA().Bundle().X509Authorities)
}

// dial connects to the agent API with mTLS as svid (nil: no client
// certificate), authenticating the server as spiffe://<td>/ironroot/server.
func (e *env) dial(svid *x509svid.SVID) agentv1.AgentClient {
	e.t.Helper()
	serverID := spiffeid.RequireFromPath(td, agentapi.ServerPath)
	var conf *tls.Config
	if svid != nil {
		conf = tlsconfig.MTLSClientConfig(svid, e.bundle(), tlsconfig.AuthorizeID(serverID))
	} else {
		conf = tlsconfig.TLSClientConfig(e.bundle(), tlsconfig.AuthorizeID(serverID))
	}
	conn, err := grpc.NewClient(e.srv.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return agentv1.NewAgentClient(conn)
}

// syncStream follows a Sync stream in the background.
type syncStream struct {
	msgs   chan *agentv1.SyncResponse
	err    chan error
	cancel func()
}

func (e *env) openSync(client agentv1.AgentClient) *syncStream {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		cancel()
		e.t.Fatalf("opening Sync: %v", err)
	}
	s := &syncStream{msgs: make(chan *agentv1.SyncResponse, 100), err: make(chan error, 1), cancel: cancel}
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				s.err <- err
				close(s.msgs)
				return
			}
			s.msgs <- m
		}
	}()
	e.t.Cleanup(cancel)
	return s
}

// syncDeadline is generous: arrival is asserted, speed is benchmarked.
const syncDeadline = 5 * time.Second

// next returns the next message, failing the test after syncDeadline.
func (s *syncStream) next(t testing.TB) *agentv1.SyncResponse {
	t.Helper()
	select {
	case m, ok := <-s.msgs:
		if !ok {
			t.Fatalf("sync stream ended: %v", <-s.err)
		}
		return m
	case <-time.After(syncDeadline):
		t.Fatalf("no sync message within %s", syncDeadline)
	}
	return nil
}

// end waits for the stream to end and returns its error.
func (s *syncStream) end(t testing.TB) error {
	t.Helper()
	deadline := time.After(syncDeadline)
	for {
		select {
		case _, ok := <-s.msgs:
			if !ok {
				return <-s.err
			}
		case <-deadline:
			t.Fatalf("sync stream still open after %s", syncDeadline)
		}
	}
}

func entryIDs(es []*agentv1.Entry) map[string]*agentv1.Entry {
	out := map[string]*agentv1.Entry{}
	for _, e := range es {
		out[e.Id] = e
	}
	return out
}
