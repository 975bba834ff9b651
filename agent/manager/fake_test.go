package manager

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
)

var testTD = spiffeid.RequireTrustDomainFromString("example.org")

const (
	testAgentID  = "spiffe://example.org/ironroot/agent/tpm/00ff"
	testServerID = "spiffe://example.org/ironroot/server"
)

// fakeServer is an in-process agent API: Sync from an entry map it can
// change, and signing with a software CA made in the test.
type fakeServer struct {
	agentv1.UnimplementedAgentServer
	t testing.TB

	mu      sync.Mutex
	caCert  *x509.Certificate
	caKey   *ecdsa.PrivateKey
	jwtKey  *ecdsa.PrivateKey
	kid     string
	seq     int64
	entries map[string]*agentv1.Entry
	streams map[chan *agentv1.SyncResponse]struct{}
	ttl     time.Duration // default X509-SVID TTL
	jwtGate chan struct{} // if set, NewJWTSVID waits for it
	refuse  map[string]bool
	denyAll bool
	split   bool // send the full set as two messages, as the server does for large sets
	denyN   int  // refuse this many more Sync calls

	syncCalls, batchCalls, csrs, jwtCalls atomic.Int64
}

func newFakeServer(t testing.TB) *fakeServer {
	t.Helper()
	f := &fakeServer{t: t, entries: make(map[string]*agentv1.Entry), streams: make(map[chan *agentv1.SyncResponse]struct{}), ttl: time.Hour, refuse: map[string]bool{}}
	var err error
	if f.jwtKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	f.kid = "jwt-1"
	f.rotateCA(t)
	return f
}

// rotateCA replaces the CA (no overlap) and sends the new bundle.
func (f *fakeServer) rotateCA(t testing.TB) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.NewCACertificate(ca.CAParams{TrustDomain: testTD, Signer: key, NotBefore: time.Now(), TTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.caCert, f.caKey = cert, key
	f.seq++
	b := f.bundleLocked()
	f.broadcastLocked(&agentv1.SyncResponse{Bundle: b})
	f.mu.Unlock()
}

func (f *fakeServer) bundleLocked() *agentv1.Bundle {
	pub, err := x509.MarshalPKIXPublicKey(f.jwtKey.Public())
	if err != nil {
		f.t.Error(err)
	}
	return &agentv1.Bundle{
		TrustDomain:     testTD.Name(),
		X509Authorities: [][]byte{f.caCert.Raw},
		JwtAuthorities:  []*agentv1.JWTAuthority{{KeyId: f.kid, PublicKey: pub}},
		SequenceNumber:  f.seq,
	}
}

func (f *fakeServer) broadcastLocked(m *agentv1.SyncResponse) {
	for ch := range f.streams {
		ch <- m
	}
}

func (f *fakeServer) upsert(es ...*agentv1.Entry) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range es {
		f.entries[e.Id] = e
	}
	f.broadcastLocked(&agentv1.SyncResponse{Upserted: es})
}

func (f *fakeServer) remove(ids ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range ids {
		delete(f.entries, id)
	}
	f.broadcastLocked(&agentv1.SyncResponse{DeletedIds: ids})
}

// breakStreams ends every open Sync stream with Unavailable.
func (f *fakeServer) breakStreams() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.streams {
		close(ch)
		delete(f.streams, ch)
	}
}

func (f *fakeServer) Sync(_ *agentv1.SyncRequest, stream grpc.ServerStreamingServer[agentv1.SyncResponse]) error {
	f.syncCalls.Add(1)
	ch := make(chan *agentv1.SyncResponse, 1024)
	f.mu.Lock()
	if f.denyAll || f.denyN > 0 {
		f.denyN--
		f.mu.Unlock()
		return status.Error(codes.PermissionDenied, "agent is banned")
	}
	full := &agentv1.SyncResponse{Full: true, Bundle: f.bundleLocked()}
	ids := make([]string, 0, len(f.entries))
	for id := range f.entries {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		full.Upserted = append(full.Upserted, f.entries[id])
	}
	if f.split && len(full.Upserted) > 1 {
		rest := &agentv1.SyncResponse{Upserted: full.Upserted[1:]}
		full.Upserted = full.Upserted[:1]
		full.More = true
		ch <- full
		ch <- rest
	} else {
		ch <- full
	}
	f.streams[ch] = struct{}{}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.streams, ch)
		f.mu.Unlock()
	}()
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case m, ok := <-ch:
			if !ok {
				return status.Error(codes.Unavailable, "stream broken by the test")
			}
			if err := stream.Send(m); err != nil {
				return err
			}
		}
	}
}

func (f *fakeServer) BatchNewX509SVID(_ context.Context, req *agentv1.BatchNewX509SVIDRequest) (*agentv1.BatchNewX509SVIDResponse, error) {
	f.batchCalls.Add(1)
	f.csrs.Add(int64(len(req.Params)))
	if len(req.Params) > MaxBatchSize {
		return nil, status.Error(codes.InvalidArgument, "batch too large")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.denyAll {
		return nil, status.Error(codes.PermissionDenied, "agent is banned")
	}
	resp := &agentv1.BatchNewX509SVIDResponse{}
	for _, p := range req.Params {
		e, ok := f.entries[p.EntryId]
		if !ok || f.refuse[p.EntryId] {
			resp.Results = append(resp.Results, &agentv1.X509SVIDResult{Status: &agentv1.Status{Code: int32(codes.PermissionDenied), Message: "not authorized"}})
			continue
		}
		csr, err := ca.ParseCSR(p.Csr)
		if err != nil {
			resp.Results = append(resp.Results, &agentv1.X509SVIDResult{Status: &agentv1.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}})
			continue
		}
		ttl := f.ttl
		if e.X509SvidTtl > 0 {
			ttl = time.Duration(e.X509SvidTtl) * time.Second
		}
		cert, err := ca.SignX509SVID(f.caCert, f.caKey, ca.SVIDParams{ID: spiffeid.RequireFromString(e.SpiffeId), PublicKey: csr.PublicKey, NotBefore: time.Now(), TTL: ttl})
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		resp.Results = append(resp.Results, &agentv1.X509SVIDResult{
			Status: &agentv1.Status{Code: int32(codes.OK)},
			Svid:   &agentv1.X509SVID{SpiffeId: e.SpiffeId, CertChain: [][]byte{cert.Raw}, ExpiresAt: cert.NotAfter.Unix()},
		})
	}
	return resp, nil
}

func (f *fakeServer) NewJWTSVID(_ context.Context, req *agentv1.NewJWTSVIDRequest) (*agentv1.NewJWTSVIDResponse, error) {
	f.jwtCalls.Add(1)
	f.mu.Lock()
	gate := f.jwtGate
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	f.mu.Lock()
	e, ok := f.entries[req.EntryId]
	ttl := 5 * time.Minute
	if ok && e.JwtSvidTtl > 0 {
		ttl = time.Duration(e.JwtSvidTtl) * time.Second
	}
	f.mu.Unlock()
	if !ok {
		return nil, status.Error(codes.PermissionDenied, "not authorized")
	}
	now := time.Now()
	token, exp, err := ca.SignJWTSVID(f.jwtKey, f.kid, ca.JWTParams{ID: spiffeid.RequireFromString(e.SpiffeId), Audience: req.Audience, IssuedAt: now, TTL: ttl})
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &agentv1.NewJWTSVIDResponse{Svid: &agentv1.JWTSVID{Token: token, SpiffeId: e.SpiffeId, ExpiresAt: exp.Unix(), IssuedAt: now.Unix()}}, nil
}

// serve runs f over bufconn and returns a client; everything stops at
// cleanup.
func (f *fakeServer) serve(t testing.TB) agentv1.AgentClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	agentv1.RegisterAgentServer(srv, f)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			t.Errorf("fake server: %v", err)
		}
	}()
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-done
	})
	return agentv1.NewAgentClient(conn)
}

// workloadEntry is an entry for the agent's workloads.
func workloadEntry(id, path string, rev int64, sels ...string) *agentv1.Entry {
	e := &agentv1.Entry{Id: id, SpiffeId: "spiffe://example.org" + path, ParentId: testAgentID, RevisionNumber: rev}
	for _, s := range sels {
		typ, val, _ := strings.Cut(s, ":")
		e.Selectors = append(e.Selectors, &agentv1.Selector{Type: typ, Value: val})
	}
	return e
}
