package attest_test

// The agent's client against a test server that runs the real verifier
// (so the TPM side is exactly what ironroot-server sees) but may then
// answer with an SVID a real server never issues: the client must refuse
// it. The client against the real server is tested in server/agentapi.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/attest"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
	"github.com/ironroot/ironroot/tpm/verifier"
)

var suite *simtest.Suite

func TestMain(m *testing.M) {
	suite = simtest.MustSuite()
	code := m.Run()
	suite.Close()
	os.Exit(code)
}

var td = spiffeid.RequireTrustDomainFromString("example.org")

func TestChooseEK(t *testing.T) {
	rsaNoCert := tpm.EK{Algorithm: tpm.AlgRSA2048}
	rsaCert := tpm.EK{Algorithm: tpm.AlgRSA2048, Certificate: []byte{1}}
	p256Cert := tpm.EK{Algorithm: tpm.AlgP256, Certificate: []byte{2}}
	p384Cert := tpm.EK{Algorithm: tpm.AlgP384, Certificate: []byte{3}}
	tests := []struct {
		name    string
		eks     []tpm.EK
		alg     string
		want    tpm.EK
		wantErr string
	}{
		{"none", nil, "", tpm.EK{}, "no endorsement key"},
		{"RSA with a certificate first", []tpm.EK{p384Cert, p256Cert, rsaCert}, "", rsaCert, ""},
		{"certified P-256 over an RSA EK without certificate", []tpm.EK{rsaNoCert, p256Cert}, "", p256Cert, ""},
		{"no certificate at all: the first", []tpm.EK{rsaNoCert, {Algorithm: tpm.AlgP256}}, "", rsaNoCert, ""},
		{"by algorithm", []tpm.EK{rsaCert, p384Cert}, tpm.AlgP384, p384Cert, ""},
		{"algorithm missing", []tpm.EK{rsaCert}, tpm.AlgP256, tpm.EK{}, "no ecc-p256 endorsement key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := attest.ChooseEK(tt.eks, tt.alg)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Algorithm != tt.want.Algorithm || string(got.Certificate) != string(tt.want.Certificate) {
				t.Fatalf("got %s %x (%v), want %s %x", got.Algorithm, got.Certificate, err, tt.want.Algorithm, tt.want.Certificate)
			}
		})
	}
}

// testCA is an in-memory X.509 CA for the test server.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), URIs: []*url.URL{td.ID().URL()},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

func (c *testCA) sign(t testing.TB, id spiffeid.ID, pub crypto.PublicKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{id.URL()},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// testServer runs the attestation protocol with the real verifier, then
// lets the test shape (or refuse) the result.
type testServer struct {
	agentv1.UnimplementedAgentServer
	t  testing.TB
	v  *verifier.Verifier
	ca *testCA
	// stall makes the server never answer the identity.
	stall bool
	// result builds the answer for the verified agent ID and key; it may
	// return an error status instead.
	result func(id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error)
}

func (s *testServer) Attest(stream agentv1.Agent_AttestServer) error {
	ctx := stream.Context()
	req, err := stream.Recv()
	if err != nil {
		return err
	}
	if s.stall {
		<-ctx.Done()
		return ctx.Err()
	}
	in := req.GetIdentity()
	sess, ch, err := s.v.Begin(ctx, tpm.Identity{EKPublic: in.EkPublic, EKCertificate: in.EkCertificate, EKIntermediates: in.EkIntermediates,
		AK: tpm.AttestationKey{Public: in.Ak.Public, CreateData: in.Ak.CreateData, CreateAttestation: in.Ak.CreateAttestation, CreateSignature: in.Ak.CreateSignature}})
	if err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	if err := stream.Send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_Challenge{Challenge: &agentv1.CredentialChallenge{Credential: ch.Credential, Secret: ch.Secret}}}); err != nil {
		return err
	}
	if req, err = stream.Recv(); err != nil {
		return err
	}
	nonce, err := sess.Activate(ctx, tpm.ActivationProof{Secret: req.GetProof().GetSecret()})
	if err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	qr := &agentv1.QuoteRequest{Nonce: nonce, PcrBank: "sha256"}
	for _, p := range s.v.PCRs() {
		qr.Pcrs = append(qr.Pcrs, uint32(p))
	}
	if err := stream.Send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_QuoteRequest{QuoteRequest: qr}}); err != nil {
		return err
	}
	if req, err = stream.Recv(); err != nil {
		return err
	}
	pev := req.GetEvidence()
	ev := tpm.PlatformEvidence{
		Quote:    tpm.Quote{Attest: pev.Quote.Attest, Signature: pev.Quote.Signature},
		EventLog: pev.EventLog,
		Key:      tpm.CertifiedKey{Public: pev.Key.Public, CertifyInfo: pev.Key.CertifyInfo, Signature: pev.Key.Signature},
	}
	for _, p := range pev.Pcrs {
		ev.PCRs = append(ev.PCRs, tpm.PCR{Index: int(p.Index), Alg: p.Alg, Digest: p.Digest})
	}
	res, err := sess.Finish(ctx, ev, nil)
	if err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	id, err := spiffeid.FromPath(td, "/ironroot/agent/tpm/"+res.EKHash)
	if err != nil {
		return err
	}
	out, err := s.result(id, res.AgentKey)
	if err != nil {
		return err
	}
	return stream.Send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_Result{Result: out}})
}

// honest is what a real server answers.
func (s *testServer) honest(id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
	return &agentv1.AttestResult{
		SpiffeId:  id.String(),
		SvidChain: [][]byte{s.ca.sign(s.t, id, key)},
		Bundle:    &agentv1.Bundle{TrustDomain: td.String(), X509Authorities: [][]byte{s.ca.cert.Raw}},
		Selectors: []*agentv1.Selector{{Type: "tpm", Value: "ek_hash:" + strings.TrimPrefix(id.Path(), "/ironroot/agent/tpm/")}},
	}, nil
}

func serve(t *testing.T, s *testServer) agentv1.AgentClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	agentv1.RegisterAgentServer(gs, s)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return agentv1.NewAgentClient(conn)
}

func TestAttest(t *testing.T) {
	v, err := verifier.New(verifier.Config{EKRoots: []*x509.Certificate{suite.CA.Root()}, EKIntermediates: []*x509.Certificate{suite.CA.Intermediate()}})
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	otherCA := newTestCA(t)
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sw := suite.Start(t)
	tp, err := tpm.Open(context.Background(), sw.Address())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })

	tests := []struct {
		name    string
		stall   bool
		result  func(s *testServer, id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error)
		wantErr string
		code    codes.Code
	}{
		{name: "honest server", result: (*testServer).honest},
		{name: "refused", result: func(*testServer, spiffeid.ID, crypto.PublicKey) (*agentv1.AttestResult, error) {
			return nil, status.Error(codes.PermissionDenied, "agent is banned")
		}, wantErr: "agent is banned", code: codes.PermissionDenied},
		{name: "SVID for another key", result: func(s *testServer, id spiffeid.ID, _ crypto.PublicKey) (*agentv1.AttestResult, error) {
			r, _ := s.honest(id, otherKey.Public())
			return r, nil
		}, wantErr: "not for the TPM-resident key"},
		{name: "SVID for another agent", result: func(s *testServer, _ spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
			other := spiffeid.RequireFromPath(td, "/ironroot/agent/tpm/"+strings.Repeat("ab", 32))
			return s.honest(other, key)
		}, wantErr: "want spiffe://example.org/ironroot/agent/tpm/"},
		{name: "result names another ID than the SVID", result: func(s *testServer, id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
			r, _ := s.honest(id, key)
			r.SpiffeId = "spiffe://example.org/elsewhere"
			return r, nil
		}, wantErr: "result says"},
		{name: "SVID not under the bundle", result: func(s *testServer, id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
			r, _ := s.honest(id, key)
			r.Bundle.X509Authorities = [][]byte{otherCA.cert.Raw}
			return r, nil
		}, wantErr: "does not verify against the bundle"},
		{name: "no bundle", result: func(s *testServer, id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
			r, _ := s.honest(id, key)
			r.Bundle = nil
			return r, nil
		}, wantErr: "no bundle"},
		{name: "no SVID", result: func(s *testServer, id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
			r, _ := s.honest(id, key)
			r.SvidChain = nil
			return r, nil
		}, wantErr: "sent no agent SVID"},
		{name: "server stalls", stall: true, wantErr: "no answer from the server within"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &testServer{t: t, v: v, ca: ca, stall: tt.stall}
			s.result = func(id spiffeid.ID, key crypto.PublicKey) (*agentv1.AttestResult, error) {
				return tt.result(s, id, key)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			step := 30 * time.Second
			if tt.stall {
				step = 300 * time.Millisecond
			}
			res, err := attest.Attest(ctx, serve(t, s), tp, attest.WithStepTimeout(step))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				if tt.code != codes.OK && status.Code(err) != tt.code {
					t.Fatalf("code %s, want %s", status.Code(err), tt.code)
				}
				return
			}
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			defer res.Key.Close()
			eks, err := tp.EndorsementKeys(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ek, _ := attest.ChooseEK(eks, "")
			hash, _ := ek.Hash()
			if res.EKHash != hash || res.ID.String() != "spiffe://example.org/ironroot/agent/tpm/"+hash ||
				len(res.SVID) != 1 || len(res.KeyBlob) == 0 || res.Bundle == nil ||
				len(res.Selectors) != 1 || res.Selectors[0] != "tpm:ek_hash:"+hash {
				t.Fatalf("result: %+v", res)
			}
			// The key blob reloads the same TPM-resident key.
			key, err := tp.LoadKey(ctx, res.KeyBlob)
			if err != nil {
				t.Fatalf("loading the key blob: %v", err)
			}
			defer key.Close()
			if !key.Public().(*ecdsa.PublicKey).Equal(res.SVID[0].PublicKey) {
				t.Fatal("the key blob holds another key than the SVID's")
			}
		})
	}
}
