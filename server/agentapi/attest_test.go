package agentapi_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/attest"
	"github.com/ironroot/ironroot/server/agentapi"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// wantCode fails the test unless err is a gRPC status with code and a
// message containing msg.
func wantCode(t testing.TB, err error, code codes.Code, msg string) {
	t.Helper()
	// FromError also finds a status wrapped by the agent client.
	st, ok := status.FromError(err)
	if err == nil || !ok || st.Code() != code || !strings.Contains(st.Message(), msg) {
		t.Fatalf("got %v, want %s containing %q", err, code, msg)
	}
}

// wantNoNodes fails the test if any node record exists.
func (e *env) wantNoNodes() {
	e.t.Helper()
	if ns := e.nodes(); len(ns) != 0 {
		e.t.Fatalf("a refused attestation left %d node records (first %s)", len(ns), ns[0].SPIFFEID)
	}
}

func TestAttestGoodNode(t *testing.T) {
	e := newServer(t, nil)
	n := startNode(t, suite)
	res, err := n.attest(e.dial())
	if err != nil {
		t.Fatalf("attesting: %v", err)
	}
	wantID := spiffeid.RequireFromString("spiffe://example.org/ironroot/agent/tpm/" + n.ek)
	if res.ID != wantID || res.EKHash != n.ek {
		t.Fatalf("agent ID %s (EK %s), want %s", res.ID, res.EKHash, wantID)
	}

	// The SVID verifies against the bundle the server sent and names the
	// agent; its key is the TPM-resident key.
	var authorities []*x509.Certificate
	for _, der := range res.Bundle.X509Authorities {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("bundle authority: %v", err)
		}
		authorities = append(authorities, c)
	}
	if res.Bundle.TrustDomain != td.String() || len(authorities) == 0 {
		t.Fatalf("bundle %s with %d authorities", res.Bundle.TrustDomain, len(authorities))
	}
	gotID, _, err := x509svid.Verify(res.SVID, x509bundle.FromX509Authorities(td, authorities))
	if err != nil || gotID != wantID {
		t.Fatalf("SVID verification: %s, %v", gotID, err)
	}
	leaf := res.SVID[0]
	if !res.Key.Public().(*ecdsa.PublicKey).Equal(leaf.PublicKey) {
		t.Fatal("the SVID's key is not the TPM-resident key")
	}
	digest := sha256.Sum256([]byte("signed in the TPM"))
	sig, err := res.Key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(leaf.PublicKey.(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatalf("TPM key signature does not verify with the SVID key: %v", err)
	}
	if ttl := leaf.NotAfter.Sub(leaf.NotBefore); ttl < 55*time.Minute || ttl > 65*time.Minute {
		t.Errorf("agent SVID lifetime %s, want the configured agent TTL of 1h", ttl)
	}

	// The node record holds the selectors, the evidence summary, the
	// current serial and the TPM clock.
	node := e.node(wantID.String())
	var sels []string
	for _, s := range node.Selectors {
		sels = append(sels, s.String())
	}
	want := []string{"tpm:ek_hash:" + n.ek, "tpm:manufacturer:id:00001014"}
	for i := range 8 {
		want = append(want, fmt.Sprintf("tpm:pcr:sha256:%d:%s", i, strings.Repeat("00", 32)))
	}
	slices.Sort(want)
	if !slices.Equal(sels, want) {
		t.Fatalf("node selectors\n%v\nwant\n%v", sels, want)
	}
	if !slices.Equal(res.Selectors, want) {
		t.Fatalf("result selectors %v, want %v", res.Selectors, want)
	}
	if node.EKHash != n.ek || node.Banned || node.CertSerial != leaf.SerialNumber.String() || !node.CertNotAfter.Equal(leaf.NotAfter) {
		t.Fatalf("node record: EK %s banned %v serial %s not-after %s; leaf serial %s not-after %s",
			node.EKHash, node.Banned, node.CertSerial, node.CertNotAfter, leaf.SerialNumber, leaf.NotAfter)
	}
	var ev agentapi.NodeEvidence
	if err := json.Unmarshal(node.Evidence, &ev); err != nil {
		t.Fatalf("evidence summary %s: %v", node.Evidence, err)
	}
	if ev.EKHash != n.ek || ev.Manufacturer != "id:00001014" || len(ev.PCRs) != 8 || ev.PCRs["7"] != strings.Repeat("00", 32) ||
		ev.SecureBoot != "" || time.Since(ev.AttestedAt) > time.Hour || len(ev.EKChain) != 3 {
		t.Fatalf("evidence summary: %s", node.Evidence)
	}
	if b, _ := pem.Decode([]byte(ev.EKChain[2].PEM)); b == nil || !bytes.Equal(b.Bytes, suite.CA.Root().Raw) {
		t.Fatalf("EK chain ends with %q, want the suite's root", ev.EKChain[2].Subject)
	}
	var clock verifier.ClockInfo
	if err := json.Unmarshal(node.Clock, &clock); err != nil || !clock.Safe || clock.Clock == 0 {
		t.Fatalf("stored clock %s: %v", node.Clock, err)
	}

	// The SVID, with its key in the TPM, authenticates the agent (mTLS) on
	// the RPCs that require it.
	svid := &x509svid.SVID{ID: res.ID, Certificates: res.SVID, PrivateKey: res.Key}
	conf := tlsconfig.MTLSClientConfig(svid, e.bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, agentapi.ServerPath)))
	conn, err := grpc.NewClient(e.srv.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := agentv1.NewAgentClient(conn).Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if first, err := stream.Recv(); err != nil || !first.Full {
		t.Fatalf("Sync with the attested SVID: %v", err)
	}
}

// TestAttestAllowListOnly admits a TPM by EK hash alone: no manufacturer
// selector, since no certificate vouched for one.
func TestAttestAllowListOnly(t *testing.T) {
	n := startNode(t, other)
	e := newServer(t, func(cfg *config.Config, dir string) {
		path := filepath.Join(dir, "allow")
		if err := os.WriteFile(path, []byte("# admitted\n"+n.ek+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg.NodeAttestation.EKRootDir = ""
		cfg.NodeAttestation.EKHashAllowList = path
	})
	res, err := n.attest(e.dial())
	if err != nil {
		t.Fatalf("attesting: %v", err)
	}
	node := e.node(res.ID.String())
	for _, s := range node.Selectors {
		if s.Value == "" || strings.HasPrefix(s.Value, "manufacturer:") {
			t.Fatalf("selector %s on an allow-listed node", s)
		}
	}
	if len(node.Selectors) != 9 {
		t.Fatalf("selectors %v, want ek_hash and 8 PCRs", node.Selectors)
	}
}

// TestAttestEventLog attests a node that booted with UEFI Secure Boot and
// sends its measured-boot log: the server replays it against the quote and
// records the Secure Boot state as a selector.
func TestAttestEventLog(t *testing.T) {
	e := newServer(t, nil)
	for _, secureBoot := range []bool{true, false} {
		t.Run(fmt.Sprintf("secure boot %v", secureBoot), func(t *testing.T) {
			l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: secureBoot})
			if err != nil {
				t.Fatal(err)
			}
			logPath := filepath.Join(t.TempDir(), "binary_bios_measurements")
			if err := os.WriteFile(logPath, l.Bytes(), 0o600); err != nil {
				t.Fatal(err)
			}
			n := startNode(t, suite)
			// Every node is a clone of the suite's TPM, so the same agent:
			// evict it between boots, or its stored clock (from a later
			// point of the same TPM's life) refuses this one as a rollback.
			t.Cleanup(func() { e.srv.Store().DeleteNode(context.Background(), n.agentID()) })
			n.extend(l.Extends(), tpm.WithEventLogPath(logPath))
			res, err := n.attest(e.dial())
			if err != nil {
				t.Fatalf("attesting: %v", err)
			}
			want := map[bool]string{true: "enabled", false: "disabled"}[secureBoot]
			if !slices.Contains(res.Selectors, "tpm:secure_boot:"+want) {
				t.Fatalf("selectors %v lack tpm:secure_boot:%s", res.Selectors, want)
			}
			var ev agentapi.NodeEvidence
			if err := json.Unmarshal(e.node(res.ID.String()).Evidence, &ev); err != nil || ev.SecureBoot != want {
				t.Fatalf("evidence secure_boot %q (%v), want %s", ev.SecureBoot, err, want)
			}
			if pcr7 := hex.EncodeToString(l.PCRs()[7]); ev.PCRs["7"] != pcr7 {
				t.Fatalf("PCR 7 %s, the log replays to %s", ev.PCRs["7"], pcr7)
			}
		})
	}
}

// TestAttestRefusedPolicy runs TPMs that the node policy refuses.
func TestAttestRefusedPolicy(t *testing.T) {
	tests := []struct {
		name  string
		suite func() *simtest.Suite
		mod   func(cfg *config.Config, dir string, ekHash string)
		msg   string
	}{
		{"TPM from another CA", func() *simtest.Suite { return other }, nil, "EK certificate not trusted"},
		{"EK not allow-listed", func() *simtest.Suite { return suite }, func(cfg *config.Config, dir, _ string) {
			path := filepath.Join(dir, "allow")
			if err := os.WriteFile(path, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg.NodeAttestation.EKHashAllowList = path
			cfg.NodeAttestation.RequireEKCertificate = true
		}, "EK not on the allow-list"},
		{"PCR policy not met", func() *simtest.Suite { return suite }, func(cfg *config.Config, _, _ string) {
			cfg.NodeAttestation.RequiredPCRs = map[int][]byte{7: bytes.Repeat([]byte{0x5a}, 32)}
		}, "PCR value violates policy"},
		// Fail closed, and the agent is not told the server's file path.
		{"allow-list unreadable", func() *simtest.Suite { return suite }, func(cfg *config.Config, dir, _ string) {
			cfg.NodeAttestation.EKHashAllowList = filepath.Join(dir, "secret-allow-list-path")
			cfg.NodeAttestation.RequireEKCertificate = true
		}, "EK not on the allow-list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t, tt.suite())
			e := newServer(t, func(cfg *config.Config, dir string) {
				if tt.mod != nil {
					tt.mod(cfg, dir, n.ek)
				}
			})
			_, err := n.attest(e.dial())
			wantCode(t, err, codes.PermissionDenied, tt.msg)
			if strings.Contains(err.Error(), "secret-allow-list-path") {
				t.Fatalf("the refusal names the server's allow-list file: %v", err)
			}
			e.wantNoNodes()
		})
	}
}

// TestAttestTampered runs a good TPM through a client that alters what
// the agent sends (or what it was asked), and checks each attempt is
// refused with PermissionDenied and stores nothing.
func TestAttestTampered(t *testing.T) {
	e := newServer(t, nil)
	n := startNode(t, suite)
	client := e.dial()

	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherCSR, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, otherKey)
	if err != nil {
		t.Fatal(err)
	}
	evidence := func(f func(*agentv1.PlatformEvidence)) func(*agentv1.AttestRequest) {
		return func(r *agentv1.AttestRequest) {
			if ev := r.GetEvidence(); ev != nil {
				f(ev)
			}
		}
	}
	tests := []struct {
		name string
		send func(*agentv1.AttestRequest)
		recv func(*agentv1.AttestResponse)
		msg  string
	}{
		{name: "wrong activation secret", send: func(r *agentv1.AttestRequest) {
			if p := r.GetProof(); p != nil {
				p.Secret[0] ^= 1
			}
		}, msg: "credential activation failed"},
		{name: "quote attestation altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Quote.Attest[len(ev.Quote.Attest)-1] ^= 1
		}), msg: "quote invalid"},
		{name: "quote signature altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Quote.Signature[len(ev.Quote.Signature)-1] ^= 1
		}), msg: "quote invalid"},
		{name: "PCR value altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Pcrs[3].Digest[0] ^= 1
		}), msg: "PCR values do not match"},
		{name: "fewer PCRs quoted than required", recv: func(r *agentv1.AttestResponse) {
			if q := r.GetQuoteRequest(); q != nil {
				q.Pcrs = q.Pcrs[:len(q.Pcrs)-1]
			}
		}, msg: "quoted PCR selection differs"},
		{name: "certified key altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Key.Public[len(ev.Key.Public)-1] ^= 1
		}), msg: "key certification invalid"},
		{name: "certification signature altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Key.Signature[len(ev.Key.Signature)-1] ^= 1
		}), msg: "key certification invalid"},
		{name: "CSR for another key", send: evidence(func(ev *agentv1.PlatformEvidence) {
			ev.Csr = otherCSR
		}), msg: "CSR is not for the TPM-resident key"},
		{name: "CSR signature altered", send: evidence(func(ev *agentv1.PlatformEvidence) {
			csr, err := x509.ParseCertificateRequest(ev.Csr)
			if err != nil {
				t.Errorf("parsing the agent's CSR: %v", err)
				return
			}
			// Re-sign the same request body with another key: a valid
			// structure whose signature does not match its key.
			tbs := sha256.Sum256(csr.RawTBSCertificateRequest)
			sig, err := ecdsa.SignASN1(rand.Reader, otherKey, tbs[:])
			if err != nil {
				t.Error(err)
				return
			}
			ev.Csr = replaceSignature(t, ev.Csr, csr.Signature, sig)
		}), msg: "CSR signature is invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := n.attest(tamperClient{AgentClient: client, send: tt.send, recv: tt.recv})
			wantCode(t, err, codes.PermissionDenied, tt.msg)
			e.wantNoNodes()
		})
	}

	// A replayed nonce: the first attempt is refused after the verifier
	// consumed its nonce (its CSR is for another key); the second quotes
	// and certifies over that old nonce instead of the one it was sent.
	t.Run("replayed nonce", func(t *testing.T) {
		var first []byte
		_, err := n.attest(tamperClient{AgentClient: client,
			recv: func(r *agentv1.AttestResponse) {
				if q := r.GetQuoteRequest(); q != nil {
					first = slices.Clone(q.Nonce)
				}
			},
			send: evidence(func(ev *agentv1.PlatformEvidence) { ev.Csr = otherCSR }),
		})
		wantCode(t, err, codes.PermissionDenied, "CSR is not for the TPM-resident key")
		if len(first) == 0 {
			t.Fatal("no nonce seen")
		}
		_, err = n.attest(tamperClient{AgentClient: client, recv: func(r *agentv1.AttestResponse) {
			if q := r.GetQuoteRequest(); q != nil {
				q.Nonce = first
			}
		}})
		wantCode(t, err, codes.PermissionDenied, "nonce invalid")
		e.wantNoNodes()
	})

	// After all that, the same TPM is admitted by an honest client.
	if _, err := n.attest(client); err != nil {
		t.Fatalf("honest attestation after refusals: %v", err)
	}
}

// replaceSignature swaps the signature BIT STRING contents of a DER CSR.
// The new signature is re-encoded at the same length class, so only the
// lengths of the BIT STRING and the outer SEQUENCE change.
func replaceSignature(t testing.TB, der, old, sig []byte) []byte {
	t.Helper()
	var raw struct {
		TBS    asn1.RawValue
		Alg    asn1.RawValue
		BitStr asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &raw); err != nil {
		t.Fatalf("decoding CSR: %v", err)
	}
	if !bytes.Equal(raw.BitStr.Bytes, old) {
		t.Fatal("CSR signature not where expected")
	}
	raw.BitStr = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	out, err := asn1.Marshal(raw)
	if err != nil {
		t.Fatalf("encoding CSR: %v", err)
	}
	return out
}

func TestAttestReattestation(t *testing.T) {
	e := newServer(t, nil)
	n := startNode(t, suite)
	client := e.dial()
	ctx := context.Background()

	first, err := n.attest(client)
	if err != nil {
		t.Fatalf("first attestation: %v", err)
	}
	firstNode := e.node(n.agentID())

	// A boot component measured into PCR 4: the next quote carries it.
	measurement := sha256.Sum256([]byte("a new boot loader"))
	n.extend([]simulator.LogEvent{{PCR: 4, Digest: measurement[:]}})
	second, err := n.attest(client)
	if err != nil {
		t.Fatalf("re-attestation: %v", err)
	}
	if second.ID != first.ID {
		t.Fatalf("re-attestation changed the agent ID: %s then %s", first.ID, second.ID)
	}
	if second.SVID[0].SerialNumber.Cmp(first.SVID[0].SerialNumber) == 0 {
		t.Fatal("re-attestation reused the serial")
	}
	node := e.node(n.agentID())
	if node.CertSerial != second.SVID[0].SerialNumber.String() || !node.CreatedAt.Equal(firstNode.CreatedAt) {
		t.Fatalf("record after re-attestation: serial %s (want %s), created %s (was %s)",
			node.CertSerial, second.SVID[0].SerialNumber, node.CreatedAt, firstNode.CreatedAt)
	}
	pcr4 := sha256.Sum256(append(make([]byte, 32), measurement[:]...))
	newSel := store.Selector{Type: "tpm", Value: "pcr:sha256:4:" + hex.EncodeToString(pcr4[:])}
	oldSel := store.Selector{Type: "tpm", Value: "pcr:sha256:4:" + strings.Repeat("00", 32)}
	if !slices.Contains(node.Selectors, newSel) || slices.Contains(node.Selectors, oldSel) || len(node.Selectors) != len(firstNode.Selectors) {
		t.Fatalf("selectors after the PCR extend: %v", node.Selectors)
	}
	if !slices.Contains(firstNode.Selectors, oldSel) {
		t.Fatalf("selectors before the PCR extend: %v", firstNode.Selectors)
	}

	// The stored clock is checked: a record claiming a later TPM clock than
	// the TPM reports (a rolled-back TPM state) is refused, unchanged.
	var clock verifier.ClockInfo
	if err := json.Unmarshal(node.Clock, &clock); err != nil {
		t.Fatal(err)
	}
	clock.Clock += 1 << 40
	ahead, _ := json.Marshal(clock)
	node.Clock = ahead
	if _, err := e.srv.Store().UpsertNode(ctx, node); err != nil {
		t.Fatal(err)
	}
	_, err = n.attest(client)
	wantCode(t, err, codes.PermissionDenied, "TPM clock information invalid")
	if got := e.node(n.agentID()); got.CertSerial != node.CertSerial || !bytes.Equal(got.Clock, ahead) {
		t.Fatal("a refused re-attestation changed the record")
	}

	// Banned: refused, and the record stays banned.
	if _, err := e.srv.Store().BanNode(ctx, n.agentID()); err != nil {
		t.Fatal(err)
	}
	_, err = n.attest(client)
	wantCode(t, err, codes.PermissionDenied, "is banned")
	if got := e.node(n.agentID()); !got.Banned || got.CertSerial != "" {
		t.Fatalf("after a refused attestation of a banned node: banned %v serial %q", got.Banned, got.CertSerial)
	}

	// Evicted: the node attests afresh, with the same ID.
	if err := e.srv.Store().DeleteNode(ctx, n.agentID()); err != nil {
		t.Fatal(err)
	}
	third, err := n.attest(client)
	if err != nil {
		t.Fatalf("attestation after eviction: %v", err)
	}
	if got := e.node(n.agentID()); got.Banned || third.ID != first.ID || got.CertSerial != third.SVID[0].SerialNumber.String() {
		t.Fatalf("after eviction: banned %v ID %s serial %s", got.Banned, third.ID, got.CertSerial)
	}
}

// run sends msgs on a raw Attest stream, half-closes it and returns the
// status the stream ended with (nil if it ended with a result).
func run(t testing.TB, client agentv1.AgentClient, msgs ...*agentv1.AttestRequest) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := client.Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		// A send after the server ended the stream fails with io.EOF;
		// Recv below returns the status.
		if err := stream.Send(m); err != nil {
			break
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if r.GetResult() != nil {
			return nil
		}
	}
}

func identityMsg(id tpm.Identity) *agentv1.AttestRequest {
	return &agentv1.AttestRequest{Step: &agentv1.AttestRequest_Identity{Identity: &agentv1.Identity{
		EkPublic: id.EKPublic, EkCertificate: id.EKCertificate, EkIntermediates: id.EKIntermediates,
		Ak: &agentv1.AttestationKey{Public: id.AK.Public, CreateData: id.AK.CreateData,
			CreateAttestation: id.AK.CreateAttestation, CreateSignature: id.AK.CreateSignature},
	}}}
}

func TestAttestMalformed(t *testing.T) {
	e := newServer(t, nil)
	n := startNode(t, suite)
	client := e.dial()
	ctx := context.Background()

	ak, err := n.tpm.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	eks, err := n.tpm.EndorsementKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := attest.ChooseEK(eks, "")
	if err != nil {
		t.Fatal(err)
	}
	good := ak.Identity(ek)
	with := func(f func(*tpm.Identity)) *agentv1.AttestRequest {
		id := good
		id.AK = good.AK
		f(&id)
		return identityMsg(id)
	}
	proof := &agentv1.AttestRequest{Step: &agentv1.AttestRequest_Proof{Proof: &agentv1.ActivationProof{Secret: make([]byte, 32)}}}
	emptyEvidence := &agentv1.AttestRequest{Step: &agentv1.AttestRequest_Evidence{Evidence: &agentv1.PlatformEvidence{}}}

	raw := []struct {
		name string
		msgs []*agentv1.AttestRequest
		msg  string
	}{
		{"stream closed at once", nil, "closed the stream before sending its identity"},
		{"empty message", []*agentv1.AttestRequest{{}}, "expected identity, got an empty message"},
		{"proof first", []*agentv1.AttestRequest{proof}, "expected identity, got proof"},
		{"evidence first", []*agentv1.AttestRequest{emptyEvidence}, "expected identity, got evidence"},
		{"no AK", []*agentv1.AttestRequest{with(func(id *tpm.Identity) { id.AK = tpm.AttestationKey{} })}, "identity.ak.public is required"},
		{"no EK", []*agentv1.AttestRequest{with(func(id *tpm.Identity) { id.EKPublic = nil })}, "identity.ek_public is required"},
		{"garbage EK public area", []*agentv1.AttestRequest{with(func(id *tpm.Identity) { id.EKPublic = []byte("garbage") })}, "malformed evidence"},
		{"oversize EK public area", []*agentv1.AttestRequest{with(func(id *tpm.Identity) {
			id.EKPublic = make([]byte, agentapi.MaxTPMStructBytes+1)
		})}, "exceeds the limit"},
		{"too many intermediates", []*agentv1.AttestRequest{with(func(id *tpm.Identity) {
			id.EKIntermediates = make([][]byte, agentapi.MaxEKIntermediates+1)
		})}, "intermediates exceed the limit"},
		{"identity twice", []*agentv1.AttestRequest{with(func(*tpm.Identity) {}), with(func(*tpm.Identity) {})}, "expected proof, got identity"},
		{"closed after the identity", []*agentv1.AttestRequest{with(func(*tpm.Identity) {})}, "closed the stream before sending its proof"},
		{"empty proof", []*agentv1.AttestRequest{with(func(*tpm.Identity) {}),
			{Step: &agentv1.AttestRequest_Proof{Proof: &agentv1.ActivationProof{}}}}, "proof.secret must be"},
	}
	for _, tt := range raw {
		t.Run(tt.name, func(t *testing.T) {
			wantCode(t, run(t, client, tt.msgs...), codes.InvalidArgument, tt.msg)
			e.wantNoNodes()
		})
	}

	// Malformed evidence from an otherwise honest agent.
	evidence := []struct {
		name string
		f    func(*agentv1.PlatformEvidence)
		msg  string
	}{
		{"oversize event log", func(ev *agentv1.PlatformEvidence) { ev.EventLog = make([]byte, agentapi.MaxEventLogBytes+1) }, "event_log of"},
		{"PCR index out of range", func(ev *agentv1.PlatformEvidence) { ev.Pcrs[0].Index = 99 }, "out of range"},
		{"PCR of another bank", func(ev *agentv1.PlatformEvidence) { ev.Pcrs[0].Alg = "sha1" }, "bank"},
		{"too many PCRs", func(ev *agentv1.PlatformEvidence) {
			for len(ev.Pcrs) <= agentapi.MaxEvidencePCRs {
				ev.Pcrs = append(ev.Pcrs, ev.Pcrs[0])
			}
		}, "evidence.pcrs must hold"},
		{"no certified key", func(ev *agentv1.PlatformEvidence) { ev.Key = nil }, "evidence.key"},
		{"no quote", func(ev *agentv1.PlatformEvidence) { ev.Quote = nil }, "evidence.quote is required"},
		{"garbage CSR", func(ev *agentv1.PlatformEvidence) { ev.Csr = []byte("not a CSR") }, "not a PKCS#10 request"},
		{"garbage quote signature", func(ev *agentv1.PlatformEvidence) { ev.Quote.Signature = []byte{0xff} }, "malformed evidence"},
	}
	for _, tt := range evidence {
		t.Run(tt.name, func(t *testing.T) {
			_, err := n.attest(tamperClient{AgentClient: client, send: func(r *agentv1.AttestRequest) {
				if ev := r.GetEvidence(); ev != nil {
					tt.f(ev)
				}
			}})
			wantCode(t, err, codes.InvalidArgument, tt.msg)
			e.wantNoNodes()
		})
	}
}

func TestAttestRateLimit(t *testing.T) {
	e := newServer(t, func(cfg *config.Config, _ string) {
		// One attempt per 10 s after a burst of 2.
		cfg.AttestRatePerIP = 0.1
	})
	client := e.dial()
	var codesSeen []codes.Code
	for range 4 {
		codesSeen = append(codesSeen, status.Code(run(t, client)))
	}
	// The burst is spent on attempts that fail for their own reason (the
	// stream is closed at once); the rest are turned away.
	if codesSeen[0] != codes.InvalidArgument || codesSeen[1] != codes.InvalidArgument || codesSeen[3] != codes.ResourceExhausted {
		t.Fatalf("codes %v, want InvalidArgument twice then ResourceExhausted", codesSeen)
	}
	e.wantNoNodes()
}
