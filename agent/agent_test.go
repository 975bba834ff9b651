package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/config"
	sconfig "github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/tpm"
)

const (
	workloadID  = "spiffe://example.org/workload"
	workloadID2 = "spiffe://example.org/workload-2"
)

// TestFirstStart: the agent attests with its TPM, its SVID's key is the
// TPM-resident key it saved, and a go-spiffe workload gets an X509-SVID and
// a JWT-SVID that verify against the server's bundles.
func TestFirstStart(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()

	if !strings.HasPrefix(svid.ID.Path(), "/ironroot/agent/tpm/") || svid.ID.TrustDomain() != td {
		t.Fatalf("agent ID %s is not an agent ID of %s", svid.ID, td)
	}
	if _, ok := svid.PrivateKey.(*tpm.Key); !ok {
		t.Fatalf("the agent SVID's key is a %T, not a TPM key", svid.PrivateKey)
	}
	node := srv.node(svid.ID)
	if node == nil {
		t.Fatal("the server has no node record after attestation")
	}
	leaf := svid.Certificates[0]
	if node.CertSerial != leaf.SerialNumber.String() {
		t.Fatalf("node serial %s, agent SVID serial %s", node.CertSerial, leaf.SerialNumber)
	}
	if !strings.HasSuffix(svid.ID.Path(), node.EKHash) {
		t.Fatalf("agent ID %s is not named after the EK hash %s", svid.ID, node.EKHash)
	}
	if !logHas(ta.logs.String(), "agent SVID issued", svid.ID.String()) {
		t.Error("the agent did not log the issued SVID")
	}

	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)
	waitHealth(t, ta, healthpb.HealthCheckResponse_SERVING)

	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	jwt, err := wl.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if jwt.ID.String() != workloadID {
		t.Fatalf("JWT-SVID for %s, want %s", jwt.ID, workloadID)
	}
	jwtBundles, err := wl.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(jwt.Marshal(), jwtBundles, []string{"db"}); err != nil {
		t.Fatalf("the JWT-SVID does not validate against the JWT bundle: %v", err)
	}
	for _, tc := range []struct {
		audience string
		ok       bool
	}{{"db", true}, {"not-db", false}} {
		_, err := wl.ValidateJWTSVID(ctx, jwt.Marshal(), tc.audience)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateJWTSVID(audience %q): err = %v, want ok = %v", tc.audience, err, tc.ok)
		}
	}

	// The saved key blob loads in this TPM, and it is the SVID's key: the
	// agent's key never left the TPM, only its wrapped form was saved.
	ta.stop()
	blob, err := os.ReadFile(filepath.Join(ta.cfg.DataDir, keyBlobFile))
	if err != nil {
		t.Fatalf("reading the saved key blob: %v", err)
	}
	saved, err := loadSaved(ta.cfg.DataDir)
	if err != nil || saved == nil {
		t.Fatalf("reading the saved SVID: %v", err)
	}
	if !saved.chain[0].Equal(leaf) {
		t.Fatal("the saved SVID is not the agent's SVID")
	}
	tp, err := tpm.Open(ctx, sw.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	key, err := tp.LoadKey(ctx, blob)
	if err != nil {
		t.Fatalf("loading the saved key blob in the TPM: %v", err)
	}
	defer key.Close()
	if !key.Public().(*ecdsa.PublicKey).Equal(leaf.PublicKey) {
		t.Fatal("the TPM key of the saved blob is not the agent SVID's key")
	}
	digest := sha256.Sum256([]byte("proof of possession"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("signing with the TPM key: %v", err)
	}
	if !ecdsa.VerifyASN1(leaf.PublicKey.(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("the TPM key's signature does not verify with the SVID's public key")
	}
}

// TestRestartResumes: an agent restarted within its SVID's lifetime
// resumes from the data directory without attesting again.
func TestRestartResumes(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	cfg := agentConfig(t, srv, sw)
	first := startAgent(t, cfg)
	svid := first.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	waitX509(t, srv, workload(t, first), workloadID)
	before := srv.node(svid.ID)
	first.stop()

	second := startAgent(t, cfg)
	// New resumed: Run does not attest when an SVID is in place.
	if got := second.serial(); got != before.CertSerial {
		t.Fatalf("after restart the agent holds SVID serial %q, want the saved %s", got, before.CertSerial)
	}
	waitX509(t, srv, workload(t, second), workloadID)
	// A Sync that works proves the server accepted the resumed SVID.
	srv.createEntry(workloadID2, svid.ID)
	waitX509(t, srv, workload(t, second), workloadID, workloadID2)

	after := srv.node(svid.ID)
	if after.CertSerial != before.CertSerial || !after.UpdatedAt.Equal(before.UpdatedAt) {
		t.Fatalf("the node record changed across the restart: serial %s → %s, updated %s → %s",
			before.CertSerial, after.CertSerial, before.UpdatedAt, after.UpdatedAt)
	}
	logs := second.logs.String()
	if !logHas(logs, "resumed saved agent SVID", svid.ID.String()) {
		t.Error("the restarted agent did not log resuming its SVID")
	}
	if logHas(logs, "agent SVID issued") {
		t.Error("the restarted agent attested again")
	}
}

// TestRenewal: with a short agent TTL the agent re-attests at half-life
// (the server records a new serial each time) and its workloads keep valid
// SVIDs all along; Sync keeps working with the renewed SVID.
func TestRenewal(t *testing.T) {
	srv := newServer(t, func(c *sconfig.Config) { c.AgentTTL = 6 * time.Second })
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	if ttl := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); ttl > 20*time.Second {
		t.Fatalf("agent SVID lifetime %s; the test needs the short agent TTL", ttl)
	}
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)

	// Two renewals, so the second runs on a renewed identity. Every fetch
	// on the way must succeed: renewal leaves no gap for workloads.
	serials := []string{srv.node(svid.ID).CertSerial}
	waitFor(t, "two re-attestations", func() bool {
		ids, err := fetchX509(srv, wl)
		if err != nil || len(ids) != 1 || ids[0] != workloadID {
			t.Fatalf("during renewal the workload got %v, %v", ids, err)
		}
		n := srv.node(svid.ID)
		if n == nil {
			t.Fatal("the node record disappeared during renewal")
		}
		if n.CertSerial != serials[len(serials)-1] {
			serials = append(serials, n.CertSerial)
		}
		return len(serials) >= 3
	})
	waitFor(t, "the agent to use the renewed SVID", func() bool {
		return ta.serial() == srv.node(svid.ID).CertSerial
	})
	// The renewed SVID drives Sync: a new entry reaches the workload.
	srv.createEntry(workloadID2, svid.ID)
	waitX509(t, srv, wl, workloadID, workloadID2)
	// The end of the previous SVID's Sync stream is part of renewal, not a
	// refusal that calls for another attestation.
	logs := ta.logs.String()
	if logHas(logs, "level=WARN", "refused") || logHas(logs, "level=ERROR") {
		t.Error("the agent logged a refusal or an error during plain renewal")
	}
}

// TestBanFailsClosed: after the node is banned, the agent's Sync and its
// re-attestation are refused, its cache is invalidated (the workload gets
// PermissionDenied) and the agent logs why.
func TestBanFailsClosed(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)

	if _, err := srv.srv.Store().BanNode(context.Background(), svid.ID.String()); err != nil {
		t.Fatalf("BanNode: %v", err)
	}
	var lastErr error
	waitFor(t, "the workload to be refused", func() bool {
		_, lastErr = fetchX509(srv, wl)
		return status.Code(lastErr) == codes.PermissionDenied
	})
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	if _, err := wl.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchJWTSVID after ban: %v, want PermissionDenied", err)
	}
	if st := ta.a.mgr.State(); st.Invalidated == "" || st.SVIDs != 0 {
		t.Fatalf("cache after ban: %+v, want invalidated and empty", st)
	}
	waitHealth(t, ta, healthpb.HealthCheckResponse_NOT_SERVING)
	logs := ta.logs.String()
	if !logHas(logs, "refused re-attestation", "banned") {
		t.Fatal("the agent did not log that the server refused it as banned")
	}
	n := srv.node(svid.ID)
	if n == nil || !n.Banned || n.CertSerial != "" {
		t.Fatalf("node after refused re-attestation: %+v, want banned with no serial", n)
	}

	// The agent keeps trying: once an operator readmits the node (evicts
	// the banned record), it attests again and its workloads recover.
	if err := srv.srv.Store().DeleteNode(context.Background(), svid.ID.String()); err != nil {
		t.Fatalf("DeleteNode: %v", err)
	}
	waitX509(t, srv, wl, workloadID)
	waitHealth(t, ta, healthpb.HealthCheckResponse_SERVING)
	if n := srv.node(svid.ID); n == nil || n.Banned || n.CertSerial != ta.serial() {
		t.Fatalf("node after readmission: %+v, want the agent's current serial %s", n, ta.serial())
	}
}

// TestAgentSVIDExpiresWhileServerDown: with the server unreachable the
// agent serves its cached SVIDs until its own SVID expires, then stops
// (fail closed), and recovers by itself when the server is back.
func TestAgentSVIDExpiresWhileServerDown(t *testing.T) {
	srv := newServer(t, func(c *sconfig.Config) { c.AgentTTL = 6 * time.Second })
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)
	bundle := srv.x509Bundle()

	srv.stop()
	// The last SVID the agent got before the server went away.
	var expires time.Time
	waitFor(t, "the workload to be refused after the agent SVID expired", func() bool {
		if cur := ta.svid(); cur != nil {
			expires = cur.Certificates[0].NotAfter
		}
		ids, err := fetchX509With(bundle, wl)
		now := time.Now()
		switch {
		case status.Code(err) == codes.PermissionDenied:
			if now.Before(expires) {
				t.Fatalf("the workload was refused at %s, before the agent SVID expired at %s", now, expires)
			}
			return true
		case err != nil || len(ids) != 1 || ids[0] != workloadID:
			t.Fatalf("with the server down the workload got %v, %v", ids, err)
		}
		return false
	})
	if !logHas(ta.logs.String(), "level=ERROR", "expired and could not be renewed") {
		t.Error("the agent did not log why it stopped serving SVIDs")
	}
	waitHealth(t, ta, healthpb.HealthCheckResponse_NOT_SERVING)

	srv.restart()
	waitX509(t, srv, wl, workloadID)
	waitHealth(t, ta, healthpb.HealthCheckResponse_SERVING)
	if n := srv.node(svid.ID); n == nil || n.CertSerial != ta.serial() {
		t.Fatalf("node after recovery: %+v, want the agent's serial %s", n, ta.serial())
	}
}

// TestEvictReattests: after the node record is deleted, the agent
// re-attests by itself and its workloads carry on.
func TestEvictReattests(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)
	old := srv.node(svid.ID).CertSerial

	if err := srv.srv.Store().DeleteNode(context.Background(), svid.ID.String()); err != nil {
		t.Fatalf("DeleteNode: %v", err)
	}
	waitFor(t, "the agent to re-attest after eviction", func() bool {
		n := srv.node(svid.ID)
		return n != nil && n.CertSerial != old && ta.serial() == n.CertSerial
	})
	srv.createEntry(workloadID2, svid.ID)
	waitX509(t, srv, wl, workloadID, workloadID2)
	if st := ta.a.mgr.State(); st.Invalidated != "" {
		t.Fatalf("cache invalidated after a successful re-attestation: %q", st.Invalidated)
	}
}

// TestServerRestart: while the server is down the workload keeps its
// SVIDs; when it is back on the same port, the agent reconnects by itself
// (without re-attesting) and follows new entries.
func TestServerRestart(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)
	serial := srv.node(svid.ID).CertSerial
	bundle := srv.x509Bundle()

	srv.stop()
	waitFor(t, "the agent to notice the server is gone", func() bool { return !ta.a.mgr.State().Connected })
	// srv.x509Bundle needs a running server: check against the bundle
	// saved before the stop.
	ids, err := fetchX509With(bundle, wl)
	if err != nil || len(ids) != 1 || ids[0] != workloadID {
		t.Fatalf("with the server down the workload got %v, %v", ids, err)
	}

	srv.restart()
	srv.createEntry(workloadID2, svid.ID)
	waitX509(t, srv, wl, workloadID, workloadID2)
	if n := srv.node(svid.ID); n.CertSerial != serial {
		t.Fatalf("the agent re-attested across a server restart (serial %s → %s)", serial, n.CertSerial)
	}
}

// TestNewRefusesBadConfig: New fails with a message naming the
// configuration key at fault.
func TestNewRefusesBadConfig(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.pem")
	if err := os.WriteFile(empty, []byte("no certificates here\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		mod  func(*config.Config)
		key  string
	}{
		{"unreachable TPM over TCP", func(c *config.Config) { c.TPM = "tcp://127.0.0.1:1" }, "agent.tpm"},
		{"unreachable TPM socket", func(c *config.Config) { c.TPM = "unix://" + filepath.Join(dir, "no-tpm.sock") }, "agent.tpm"},
		{"missing TPM device", func(c *config.Config) { c.TPM = filepath.Join(dir, "tpmrm9") }, "agent.tpm"},
		{"missing trust bundle", func(c *config.Config) { c.TrustBundlePath = filepath.Join(dir, "missing.pem") }, "agent.trust_bundle_path"},
		{"trust bundle without certificates", func(c *config.Config) { c.TrustBundlePath = empty }, "agent.trust_bundle_path"},
		{"data dir under a file", func(c *config.Config) { c.DataDir = filepath.Join(notDir, "data") }, "agent.data_dir"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := agentConfig(t, srv, sw)
			tc.mod(cfg)
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			a, err := New(ctx, cfg, nil)
			if err == nil {
				a.Close()
				t.Fatal("New accepted a bad configuration")
			}
			if !strings.HasPrefix(err.Error(), tc.key+":") {
				t.Fatalf("error %q does not start with the key %s", err, tc.key)
			}
		})
	}
	// The refused starts left the TPM usable: a good configuration starts.
	a, err := New(context.Background(), agentConfig(t, srv, sw), nil)
	if err != nil {
		t.Fatalf("New with a good configuration after refusals: %v", err)
	}
	a.Close()
}

// TestCARotationTrust: the agent follows the bundle the server sends over
// Sync and saves it, so after a CA rotation (and the old CA's expiry) an
// agent restarted with its original -trustBundle file, which holds only
// the old CA, still authenticates the server.
func TestCARotationTrust(t *testing.T) {
	const caTTL = 12 * time.Second
	srv := newServer(t, func(c *sconfig.Config) {
		c.CATTL = caTTL
		c.AgentTTL = 6 * time.Second
	})
	first := srv.srv.CA().ActiveCA()
	sw := suite.Start(t)
	cfg := agentConfig(t, srv, sw)
	ta := startAgent(t, cfg)
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)

	// Rotation, then the first CA's expiry: nothing signed by it is valid.
	waitFor(t, "the first CA to expire", func() bool {
		active := srv.srv.CA().ActiveCA()
		return active != nil && !active.Equal(first) && time.Now().After(first.NotAfter)
	})
	saved, err := loadBundleFile(td, filepath.Join(cfg.DataDir, bundleFile))
	if err != nil {
		t.Fatalf("reading the saved bundle: %v", err)
	}
	active := srv.srv.CA().ActiveCA()
	if !saved.HasX509Authority(active) {
		waitFor(t, "the agent to save the rotated bundle", func() bool {
			saved, err = loadBundleFile(td, filepath.Join(cfg.DataDir, bundleFile))
			return err == nil && saved.HasX509Authority(active)
		})
	}
	orig, err := loadBundleFile(td, cfg.TrustBundlePath)
	if err != nil {
		t.Fatal(err)
	}
	if orig.HasX509Authority(active) {
		t.Fatal("the -trustBundle file already holds the new CA: the test proves nothing")
	}
	// The running agent kept working across the rotation.
	waitX509(t, srv, wl, workloadID)
	ta.stop()

	again := startAgent(t, cfg)
	srv.createEntry(workloadID2, svid.ID)
	waitX509(t, srv, workload(t, again), workloadID, workloadID2)
}

// TestRunFromFlags: `ironroot-agent run` works from flags alone, and a
// cancelled context (SIGINT/SIGTERM in main) stops it cleanly, releasing
// the TPM for the next start.
func TestRunFromFlags(t *testing.T) {
	srv := newServer(t, nil)
	sw := suite.Start(t)
	cfg := agentConfig(t, srv, sw)
	args := []string{
		"-serverAddress", cfg.ServerAddress, "-tpm", cfg.TPM, "-socketPath", cfg.SocketPath,
		"-dataDir", cfg.DataDir, "-trustBundle", cfg.TrustBundlePath, "-trustDomain", "example.org",
		"-logLevel", "warn", "-logFormat", "json",
	}
	run := func() (cancel func() error) {
		ctx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- RunFromArgs(ctx, args) }()
		var once sync.Once
		var err error
		cancel = func() error {
			once.Do(func() { stop(); err = <-done })
			return err
		}
		t.Cleanup(func() { cancel() })
		return cancel
	}
	stop := run()
	var nodes []*store.Node
	waitFor(t, "the agent to attest", func() bool {
		var err error
		nodes, _, err = srv.srv.Store().ListNodes(context.Background(), store.ListNodesRequest{})
		return err == nil && len(nodes) == 1
	})
	agentID, err := spiffeid.FromString(nodes[0].SPIFFEID)
	if err != nil {
		t.Fatal(err)
	}
	srv.createEntry(workloadID, agentID)
	wl := workload(t, &testAgent{cfg: cfg})
	waitX509(t, srv, wl, workloadID)
	if err := stop(); err != nil {
		t.Fatalf("RunFromArgs after cancel: %v", err)
	}
	if _, err := os.Stat(cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the Workload API socket is left behind after stop: %v", err)
	}

	// The TPM was released: a second run starts, resumes and serves.
	stop = run()
	waitX509(t, srv, wl, workloadID)
	if err := stop(); err != nil {
		t.Fatalf("second RunFromArgs after cancel: %v", err)
	}
	if n := srv.node(agentID); n.CertSerial != nodes[0].CertSerial {
		t.Errorf("the second run attested again (serial %s → %s) instead of resuming", nodes[0].CertSerial, n.CertSerial)
	}
}

// TestPolicyNoLongerMet: when the server's PCR policy stops admitting the
// node, its next renewal is refused and the agent fails closed, saying
// why; once the policy admits it again, it recovers by itself.
func TestPolicyNoLongerMet(t *testing.T) {
	srv := newServer(t, func(c *sconfig.Config) { c.AgentTTL = 6 * time.Second })
	sw := suite.Start(t)
	ta := startAgent(t, agentConfig(t, srv, sw))
	svid := ta.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	wl := workload(t, ta)
	waitX509(t, srv, wl, workloadID)

	// swtpm's PCR 7 is all zeros: require something else.
	srv.cfg.NodeAttestation.RequiredPCRs = map[int][]byte{7: bytes.Repeat([]byte{1}, 32)}
	srv.restart()
	waitFor(t, "the workload to be refused after the refused renewal", func() bool {
		_, err := fetchX509(srv, wl)
		return status.Code(err) == codes.PermissionDenied
	})
	if !logHas(ta.logs.String(), "level=ERROR", "refused re-attestation", "PCR") {
		t.Error("the agent did not log that re-attestation was refused over the PCR policy")
	}
	waitHealth(t, ta, healthpb.HealthCheckResponse_NOT_SERVING)

	srv.cfg.NodeAttestation.RequiredPCRs = nil
	srv.restart()
	waitX509(t, srv, wl, workloadID)
	waitHealth(t, ta, healthpb.HealthCheckResponse_SERVING)
}

// TestRunBeforeAttestation: Run binds the Workload API socket before it
// first reaches the server, so a bad socket_path stops start-up at once,
// and while the server is unreachable workloads and health probes get a
// clear answer (PermissionDenied, NOT_SERVING) instead of no socket.
func TestRunBeforeAttestation(t *testing.T) {
	sw := suite.Start(t)
	dir := t.TempDir()
	// Any CA certificate will do: the server is never reached.
	ca := certFor(t, mustKey(t).Public(), "spiffe://example.org/ca", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	bundlePath := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundlePath, pemCerts([]*x509.Certificate{ca}), 0o600); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A port nothing listens on: bind one and close it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	unreachable := l.Addr().String()
	l.Close()
	newCfg := func(t *testing.T) *config.Config {
		return &config.Config{
			ServerAddress:   unreachable,
			TPM:             sw.Address(),
			SocketPath:      filepath.Join(shortTempDir(t, "iag-"), "api.sock"),
			DataDir:         filepath.Join(t.TempDir(), "agent-data"),
			TrustDomain:     td,
			TrustBundlePath: bundlePath,
		}
	}

	t.Run("bad socket path", func(t *testing.T) {
		cfg := newCfg(t)
		cfg.SocketPath = filepath.Join(notDir, "api.sock")
		a, err := New(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		err = a.Run(ctx)
		if err == nil || !strings.HasPrefix(err.Error(), "agent.socket_path:") {
			t.Fatalf("Run = %v, want an error naming agent.socket_path", err)
		}
	})

	t.Run("server unreachable", func(t *testing.T) {
		cfg := newCfg(t)
		ta := startAgent(t, cfg)
		waitHealth(t, ta, healthpb.HealthCheckResponse_NOT_SERVING)
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		if _, err := workload(t, ta).FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("FetchX509SVID before attestation: %v, want PermissionDenied", err)
		}
		waitFor(t, "the agent to log the failed attestation", func() bool {
			return logHas(ta.logs.String(), "level=WARN", "attestation failed; retrying")
		})
		ta.stop()
		if _, err := os.Stat(cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the Workload API socket is left behind after stop: %v", err)
		}
	})
}

func mustKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
