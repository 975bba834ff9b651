// Package server assembles ironroot-server: the SQLite store, the HSM-held
// CA, the TPM verifier, the agent API over TLS, the admin API on a unix
// socket and the health endpoints.
package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/ironroot/ironroot/hsm"
	"github.com/ironroot/ironroot/server/agentapi"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// maxMessageBytes caps gRPC messages on the agent API (evidence with an
// event log is the largest request).
const maxMessageBytes = 4 << 20

// Server is a running ironroot-server.
type Server struct {
	cfg      *config.Config
	log      *slog.Logger
	serverID spiffeid.ID

	store store.Store
	hsm   *hsm.HSM
	// upstreamHSM holds the upstream CA key, when configured.
	upstreamHSM *hsm.HSM
	ca          *ca.Manager
	entries     *entrycache.Cache
	verifier    *verifier.Verifier
	agentAPI    *agentapi.Service

	agentLis  net.Listener
	adminLis  net.Listener
	healthLis net.Listener
	agentSrv  *grpc.Server
	adminSrv  *grpc.Server
	healthSrv *http.Server
	health    *health.Server

	svidMu   sync.RWMutex
	svidCert *tls.Certificate

	closeOnce sync.Once
}

// New opens every part of the server and binds its listeners; it refuses to
// start (and leaves nothing running) when any part is misconfigured or the
// HSM does not hold the keys the CA journal names.
func New(ctx context.Context, cfg *config.Config, logger *slog.Logger) (_ *Server, err error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: logger}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	s.serverID, err = spiffeid.FromPath(cfg.TrustDomain, agentapi.ServerPath)
	if err != nil {
		return nil, fmt.Errorf("server ID: %w", err)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("server.data_dir: %w", err)
	}
	st, err := store.OpenSQLite(ctx, filepath.Join(cfg.DataDir, "datastore.sqlite3"), store.WithLogger(logger))
	if err != nil {
		return nil, fmt.Errorf("opening the store: %w", err)
	}
	s.store = st

	h, err := hsm.Open(ctx, cfg.HSM, hsm.WithLogger(logger))
	if err != nil {
		return nil, fmt.Errorf("server.hsm: %w", err)
	}
	s.hsm = h
	hsmURI, err := hsm.ParseURI(cfg.HSM)
	if err != nil {
		return nil, fmt.Errorf("server.hsm: %w", err)
	}
	keys := ca.HSMKeyStore(h, hsmURI.Token)

	var upstream *ca.Upstream
	if cfg.Upstream != nil {
		if upstream, s.upstreamHSM, err = loadUpstream(ctx, cfg.Upstream, h, logger); err != nil {
			return nil, err
		}
	}
	s.ca, err = ca.NewManager(ctx, ca.Config{
		TrustDomain: cfg.TrustDomain,
		Store:       st,
		Keys:        keys,
		X509KeyType: cfg.CAKeyType,
		JWTKeyType:  cfg.JWTKeyType,
		TTL:         cfg.CATTL,
		Upstream:    upstream,
		Logger:      logger.With("component", "ca"),
	})
	if err != nil {
		return nil, fmt.Errorf("starting the CA: %w", err)
	}

	s.entries, err = entrycache.New(ctx, st, s.serverID, entrycache.WithLogger(logger))
	if err != nil {
		return nil, fmt.Errorf("loading entries: %w", err)
	}

	vcfg, err := verifierConfig(cfg.NodeAttestation)
	if err != nil {
		return nil, err
	}
	s.verifier, err = verifier.New(vcfg, verifier.WithLogger(logger.With("component", "verifier")))
	if err != nil {
		return nil, fmt.Errorf("node_attestation.tpm: %w", err)
	}

	s.agentAPI, err = agentapi.New(agentapi.Config{
		TrustDomain:        cfg.TrustDomain,
		Store:              st,
		Entries:            s.entries,
		CA:                 s.ca,
		Verifier:           s.verifier,
		AgentTTL:           cfg.AgentTTL,
		DefaultX509SVIDTTL: cfg.DefaultX509SVIDTTL,
		DefaultJWTSVIDTTL:  cfg.DefaultJWTSVIDTTL,
		AttestRatePerIP:    cfg.AttestRatePerIP,
		StepTimeout:        cfg.AttestStepTimeout,
		Logger:             logger.With("component", "agentapi"),
	})
	if err != nil {
		return nil, err
	}
	if err := s.rotateServerSVID(); err != nil {
		return nil, err
	}

	s.health = health.NewServer()
	if err := s.listen(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) listen() error {
	var err error
	addr := net.JoinHostPort(s.cfg.BindAddress, fmt.Sprint(s.cfg.ServerPort))
	s.agentLis, err = net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening on %s (server.bind_address/bind_port): %w", addr, err)
	}
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			s.svidMu.RLock()
			defer s.svidMu.RUnlock()
			return s.svidCert, nil
		},
		// Agents present their SVID on every RPC but Attest; the chain is
		// verified per RPC against the current bundle and node record, since
		// the bundle rotates. The handshake still proves key possession.
		ClientAuth: tls.RequestClientCert,
	}
	s.agentSrv = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConf)),
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	agentv1.RegisterAgentServer(s.agentSrv, s.agentAPI)
	grpc_health_v1.RegisterHealthServer(s.agentSrv, s.health)

	if s.adminLis, err = listenAdmin(s.cfg.SocketPath); err != nil {
		return err
	}
	s.adminSrv = grpc.NewServer(grpc.MaxRecvMsgSize(maxMessageBytes))
	if err := registerAdmin(s); err != nil {
		return err
	}
	grpc_health_v1.RegisterHealthServer(s.adminSrv, s.health)

	if s.cfg.Health.Enabled {
		haddr := net.JoinHostPort(s.cfg.Health.BindAddress, fmt.Sprint(s.cfg.Health.BindPort))
		if s.healthLis, err = net.Listen("tcp", haddr); err != nil {
			return fmt.Errorf("listening on %s (health_checks): %w", haddr, err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc(s.cfg.Health.LivePath, func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("ok\n"))
		})
		mux.HandleFunc(s.cfg.Health.ReadyPath, s.ready)
		s.healthSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	}
	return nil
}

// listenAdmin makes the admin socket's directory 0700 (only the server's
// user may administer it) and replaces a stale socket.
func listenAdmin(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("server.socket_path: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("server.socket_path: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("server.socket_path: %s exists and is not a socket", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("server.socket_path: %s is in use by another server", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("server.socket_path: removing stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("server.socket_path: %w", err)
	}
	return l, nil
}

// ready reports 200 when the CA has an active key and the HSM answers.
func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	if s.ca.ActiveCA() == nil {
		http.Error(w, "no active CA\n", http.StatusServiceUnavailable)
		return
	}
	if _, err := s.hsm.Keys(ctx); err != nil {
		http.Error(w, "HSM unavailable\n", http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte("ready\n"))
}

// Addr is the agent API's listening address.
func (s *Server) Addr() net.Addr { return s.agentLis.Addr() }

// CA returns the server's CA manager.
func (s *Server) CA() *ca.Manager { return s.ca }

// Store returns the server's store.
func (s *Server) Store() store.Store { return s.store }

// Run serves until ctx ends, then stops gracefully.
func (s *Server) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	var wg sync.WaitGroup
	spawn := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }

	spawn(func() {
		if err := s.entries.Run(ctx); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("entry cache: %w", err)
		}
	})
	spawn(func() { s.ca.Run(ctx, rotationInterval(s.cfg.CATTL)) })
	spawn(func() { s.svidRotator(ctx) })
	spawn(func() {
		if err := s.agentSrv.Serve(s.agentLis); err != nil {
			errc <- fmt.Errorf("agent API: %w", err)
		}
	})
	spawn(func() {
		if err := s.adminSrv.Serve(s.adminLis); err != nil {
			errc <- fmt.Errorf("admin API: %w", err)
		}
	})
	if s.healthSrv != nil {
		spawn(func() {
			if err := s.healthSrv.Serve(s.healthLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("health listener: %w", err)
			}
		})
	}
	s.health.SetServingStatus("", grpc_health_v1.HealthCheckResponse_SERVING)
	s.log.Info("ironroot-server started",
		"trust_domain", s.cfg.TrustDomain.String(),
		"address", s.agentLis.Addr().String(),
		"admin_socket", s.cfg.SocketPath,
		"hsm", s.hsm.URI())

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	s.health.Shutdown()
	cancel()
	s.stopServers()
	wg.Wait()
	return err
}

func (s *Server) stopServers() {
	done := make(chan struct{})
	// Sync streams never end on their own and GracefulStop waits for them:
	// end them first, and bound the wait for other RPCs.
	s.agentAPI.Stop()
	go func() {
		s.agentSrv.GracefulStop()
		s.adminSrv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		s.agentSrv.Stop()
		s.adminSrv.Stop()
	}
	if s.healthSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.healthSrv.Shutdown(ctx)
	}
}

// Close releases everything New opened. Run's caller closes after Run.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		if s.agentLis != nil {
			s.agentLis.Close()
		}
		if s.adminLis != nil {
			s.adminLis.Close()
			os.Remove(s.cfg.SocketPath)
		}
		if s.healthLis != nil {
			s.healthLis.Close()
		}
		if s.entries != nil {
			s.entries.Close()
		}
		if s.upstreamHSM != nil {
			s.upstreamHSM.Close()
		}
		if s.hsm != nil {
			s.hsm.Close()
		}
		if s.store != nil {
			s.store.Close()
		}
	})
}

// rotationInterval ticks often enough for the 1/2 and 5/6 thresholds to be
// met promptly with short test TTLs, and every 10 s (as SPIRE) otherwise.
func rotationInterval(ttl time.Duration) time.Duration {
	return min(max(ttl/120, 100*time.Millisecond), 10*time.Second)
}

// rotateServerSVID signs a fresh TLS certificate for the server's own ID.
// Its key lives in memory only: it is short-lived, re-made at half-life,
// and guards transport, not identity issuance (the CA keys stay in the HSM).
func (s *Server) rotateServerSVID() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating server TLS key: %w", err)
	}
	chain, err := s.ca.SignX509SVID(ca.SVIDParams{ID: s.serverID, PublicKey: key.Public(), NotBefore: time.Now(), TTL: s.cfg.DefaultX509SVIDTTL})
	if err != nil {
		return fmt.Errorf("signing server SVID: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	s.svidMu.Lock()
	s.svidCert = cert
	s.svidMu.Unlock()
	return nil
}

func (s *Server) svidRotator(ctx context.Context) {
	bundleCh, cancel := s.ca.SubscribeBundle()
	defer cancel()
	for {
		s.svidMu.RLock()
		leaf := s.svidCert.Leaf
		s.svidMu.RUnlock()
		half := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
		t := time.NewTimer(max(time.Until(half), time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-bundleCh:
			t.Stop()
			// A new CA may have been activated: re-sign under it so agents
			// that only trust the new bundle can still connect.
			if active := s.ca.ActiveCA(); active != nil && active.Equal(s.issuerOf(leaf)) {
				continue
			}
		}
		if err := s.rotateServerSVID(); err != nil {
			s.log.Error("rotating server SVID", "error", err)
		}
	}
}

func (s *Server) issuerOf(leaf *x509.Certificate) *x509.Certificate {
	for _, a := range s.ca.X509Authorities() {
		if leaf.CheckSignatureFrom(a.Cert) == nil {
			return a.Cert
		}
	}
	return nil
}

// verifierConfig turns the node policy into the verifier's configuration,
// reading the EK root directory: self-signed certificates are roots, the
// others intermediates.
func verifierConfig(p config.TPMPolicy) (verifier.Config, error) {
	vc := verifier.Config{
		RequireEKCertificate: p.RequireEKCertificate,
		PCRs:                 p.PCRs,
		RequiredPCRs:         p.RequiredPCRs,
	}
	if p.EKRootDir != "" {
		certs, err := readCertDir(p.EKRootDir)
		if err != nil {
			return vc, fmt.Errorf("node_attestation.tpm.ek_root_dir: %w", err)
		}
		for _, c := range certs {
			if c.CheckSignatureFrom(c) == nil && c.Subject.String() == c.Issuer.String() {
				vc.EKRoots = append(vc.EKRoots, c)
			} else {
				vc.EKIntermediates = append(vc.EKIntermediates, c)
			}
		}
		if len(vc.EKRoots) == 0 {
			return vc, fmt.Errorf("node_attestation.tpm.ek_root_dir: %s holds no self-signed root certificate", p.EKRootDir)
		}
	}
	if p.EKHashAllowList != "" {
		vc.AllowList = verifier.FileAllowList(p.EKHashAllowList)
	}
	return vc, nil
}

// readCertDir reads every PEM or DER certificate file in dir.
func readCertDir(dir string) ([]*x509.Certificate, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for _, e := range ents {
		if e.IsDir() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		certs, err := parseCerts(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		out = append(out, certs...)
	}
	return out, nil
}

// parseCerts reads PEM certificates, or one DER certificate.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) > 0 {
		return out, nil
	}
	c, err := x509.ParseCertificate(data)
	if err != nil {
		return nil, errors.New("no PEM or DER certificate found")
	}
	return []*x509.Certificate{c}, nil
}

// loadUpstream reads the upstream CA chain and finds its key on a token.
// A token of the CA's own PKCS#11 module is opened through that module: a
// module is initialised once per process.
func loadUpstream(ctx context.Context, u *config.Upstream, main *hsm.HSM, logger *slog.Logger) (*ca.Upstream, *hsm.HSM, error) {
	data, err := os.ReadFile(u.CertificatePath)
	if err != nil {
		return nil, nil, fmt.Errorf("server.upstream_ca_certificate: %w", err)
	}
	chain, err := parseCerts(data)
	if err != nil {
		return nil, nil, fmt.Errorf("server.upstream_ca_certificate: %w", err)
	}
	uri, err := hsm.ParseURI(u.KeyURI)
	if err != nil {
		return nil, nil, fmt.Errorf("server.upstream_ca_key: %w", err)
	}
	if uri.ID == nil && uri.Object == "" {
		return nil, nil, errors.New("server.upstream_ca_key: the URI must name the key (id= or object=)")
	}
	var h *hsm.HSM
	if uri.ModulePath == "" || uri.ModulePath == main.Module().Path() {
		h, err = main.Module().Open(ctx, u.KeyURI, hsm.WithLogger(logger))
	} else {
		h, err = hsm.Open(ctx, u.KeyURI, hsm.WithLogger(logger))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("server.upstream_ca_key: %w", err)
	}
	key, err := h.FindKey(ctx, hsm.KeyRef{ID: uri.ID, Label: uri.Object})
	if err != nil {
		h.Close()
		return nil, nil, fmt.Errorf("server.upstream_ca_key: %w", err)
	}
	return &ca.Upstream{Chain: chain, Signer: key}, h, nil
}
