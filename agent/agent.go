// Package agent assembles ironroot-agent: it proves the host to the server
// with the TPM, keeps the agent SVID (whose key lives in the TPM) renewed by
// re-attestation at half-life, follows the server's entries through the
// SVID cache and serves workloads over the SPIFFE Workload API.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/attest"
	"github.com/ironroot/ironroot/agent/config"
	"github.com/ironroot/ironroot/agent/manager"
	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/tpm"
	"github.com/ironroot/ironroot/workloadapi"
)

// serverPath is the path of the server's SPIFFE ID, which the agent
// requires of the server's TLS certificate.
const serverPath = "/ironroot/server"

// Retry bounds for attestation while the server is unreachable or refuses.
const (
	minRetry = time.Second
	maxRetry = time.Minute
	// maxReconnect bounds gRPC's reconnect backoff to the server, as the
	// SVID cache bounds its Sync retries (manager.DefaultMaxBackoff).
	maxReconnect = manager.DefaultMaxBackoff
)

// Agent is a running ironroot-agent.
type Agent struct {
	cfg      *config.Config
	log      *slog.Logger
	tpm      *tpm.TPM
	serverID spiffeid.ID
	id       *identity
	mgr      *manager.Manager
	wl       *workloadapi.Server

	connMu sync.Mutex
	conn   *grpc.ClientConn

	reattest chan struct{}
	// renewing is set while renewLoop re-attests: the server ends the
	// Sync stream of the previous SVID as soon as it records the new one,
	// and that refusal must not start another re-attestation.
	renewing atomic.Bool
}

// New opens the TPM, loads the trust bundle and resumes the saved identity
// when it is still valid. It does not contact the server: Run does.
func New(ctx context.Context, cfg *config.Config, logger *slog.Logger) (_ *Agent, err error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	a := &Agent{cfg: cfg, log: logger, reattest: make(chan struct{}, 1)}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	if a.serverID, err = spiffeid.FromPath(cfg.TrustDomain, serverPath); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent.data_dir: %w", err)
	}
	var topts []tpm.Option
	if cfg.EventLogPath != "" {
		topts = append(topts, tpm.WithEventLogPath(cfg.EventLogPath))
	}
	topts = append(topts, tpm.WithLogger(logger.With("component", "tpm")))
	if a.tpm, err = tpm.Open(ctx, cfg.TPM, topts...); err != nil {
		return nil, fmt.Errorf("agent.tpm: %w", err)
	}
	a.id = &identity{td: cfg.TrustDomain}
	if err := a.loadTrust(); err != nil {
		return nil, err
	}
	chain, key, err := resume(ctx, a.tpm, cfg.DataDir, cfg.TrustDomain, time.Now())
	if err != nil {
		// A bad saved identity is not fatal: attest afresh.
		a.log.Warn("not resuming the saved identity", "error", err)
	} else if chain != nil {
		if err := a.id.set(chain, key, time.Time{}); err != nil {
			return nil, err
		}
		a.log.Info("resumed saved agent SVID", "spiffe_id", a.id.current().ID.String(), "expires", chain[0].NotAfter)
	}

	a.mgr, err = manager.New(manager.Config{
		TrustDomain: cfg.TrustDomain,
		Logger:      logger.With("component", "cache"),
		OnAuthError: func(err error) {
			if a.renewing.Load() {
				a.log.Debug("sync with the previous agent SVID ended during renewal", "error", err)
				return
			}
			a.log.Warn("the server refused the agent's SVID; re-attesting", "error", err)
			select {
			case a.reattest <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		return nil, err
	}
	attestor := unix.New(
		unix.WithPathSelectors(a.mgr.UsesPathSelectors),
		unix.WithSHA256Selectors(a.mgr.UsesSHA256Selectors),
		unix.WithLogger(logger.With("component", "unix")),
	)
	if a.wl, err = workloadapi.New(attestor, a.mgr, workloadapi.WithLogger(logger.With("component", "workloadapi"))); err != nil {
		return nil, err
	}
	// Health probes see NOT_SERVING until the first sync is signed.
	a.wl.SetServing(false)
	return a, nil
}

// refreshServing makes the Workload API's health service report SERVING
// only while the cache has synced and is not invalidated.
func (a *Agent) refreshServing() {
	select {
	case <-a.mgr.Ready():
		a.wl.SetServing(a.mgr.State().Invalidated == "")
	default:
		a.wl.SetServing(false)
	}
}

// invalidate fails closed: the cache drops every SVID and health probes
// report NOT_SERVING.
func (a *Agent) invalidate(reason string) {
	a.mgr.Invalidate(reason)
	a.refreshServing()
}

// loadTrust reads the configured trust bundle and, if a previous run saved
// one (it follows CA rotation), adds that too.
func (a *Agent) loadTrust() error {
	b, err := loadBundleFile(a.cfg.TrustDomain, a.cfg.TrustBundlePath)
	if err != nil {
		return fmt.Errorf("agent.trust_bundle_path: %w", err)
	}
	certs := b.X509Authorities()
	if saved, err := loadBundleFile(a.cfg.TrustDomain, filepath.Join(a.cfg.DataDir, bundleFile)); err == nil {
		certs = append(certs, saved.X509Authorities()...)
	}
	a.id.mu.Lock()
	a.id.bundle = x509bundle.FromX509Authorities(a.cfg.TrustDomain, certs)
	a.id.mu.Unlock()
	return nil
}

// Close releases the TPM and the server connection.
func (a *Agent) Close() {
	a.connMu.Lock()
	if a.conn != nil {
		a.conn.Close()
		a.conn = nil
	}
	a.connMu.Unlock()
	if a.id != nil {
		a.id.close()
	}
	if a.tpm != nil {
		a.tpm.Close()
	}
}

// Run attests (unless a saved SVID was resumed), then serves the Workload
// API and keeps the identity renewed until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Bind the socket before attesting: a bad socket_path stops start-up
	// at once instead of after the server is first reached. Until the
	// first sync, workloads are told PermissionDenied and health probes
	// see NOT_SERVING.
	lis, err := workloadapi.Listen(a.cfg.SocketPath)
	if err != nil {
		return fmt.Errorf("agent.socket_path: %w", err)
	}
	errc := make(chan error, 5)
	var wg sync.WaitGroup
	spawn := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil && ctx.Err() == nil {
				errc <- err
			}
		}()
	}
	stop := func(err error) error {
		cancel()
		a.wl.Stop()
		wg.Wait()
		return err
	}
	spawn(func() error {
		if err := a.wl.Serve(ctx, lis); err != nil {
			return fmt.Errorf("agent.socket_path: %w", err)
		}
		return nil
	})
	a.log.Info("workload API listening", "socket", a.cfg.SocketPath)
	if a.id.current() == nil {
		if err := a.attestUntilAdmitted(ctx); err != nil {
			return stop(err)
		}
	}
	if err := a.connect(); err != nil {
		return stop(err)
	}
	spawn(func() error { return a.mgr.Run(ctx) })
	spawn(func() error { a.followBundle(ctx); return nil })
	spawn(func() error { a.renewLoop(ctx); return nil })
	spawn(func() error {
		select {
		case <-a.mgr.Ready():
			a.refreshServing()
		case <-ctx.Done():
		}
		return nil
	})
	a.log.Info("ironroot-agent started", "spiffe_id", a.id.current().ID.String(), "server", a.cfg.ServerAddress, "socket", a.cfg.SocketPath)

	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	return stop(err)
}

// dial opens a connection to the server's agent API. With mTLS the agent
// presents its SVID (TPM key); without, only the server is authenticated
// (attestation). Either way the server must prove it is the server ID.
func (a *Agent) dial(mtls bool) (*grpc.ClientConn, error) {
	var tlsConf = tlsconfig.TLSClientConfig(a.id, tlsconfig.AuthorizeID(a.serverID))
	if mtls {
		tlsConf = tlsconfig.MTLSClientConfig(a.id, a.id, tlsconfig.AuthorizeID(a.serverID))
	}
	conn, err := grpc.NewClient(a.cfg.ServerAddress,
		grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		// gRPC's default reconnect backoff grows to 2 min: after a long
		// server outage the agent would sit idle that long once the server
		// is back. Cap it at the cache's own Sync retry ceiling.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: minRetry, Multiplier: 1.6, Jitter: 0.2, MaxDelay: maxReconnect},
			MinConnectTimeout: 20 * time.Second,
		}),
		// The Sync stream is idle between changes: pings notice a peer that
		// vanished without closing the connection (within the server's
		// keepalive enforcement of 10 s).
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}))
	if err != nil {
		return nil, fmt.Errorf("agent.server_address: %w", err)
	}
	return conn, nil
}

// connect (re)opens the mTLS connection with the current SVID and hands the
// client to the cache. A new connection is needed after re-attestation: the
// server checks the serial of the certificate a connection was opened with.
func (a *Agent) connect() error {
	conn, err := a.dial(true)
	if err != nil {
		return err
	}
	a.connMu.Lock()
	old := a.conn
	a.conn = conn
	a.connMu.Unlock()
	a.mgr.SetClient(agentv1.NewAgentClient(conn))
	if old != nil {
		old.Close()
	}
	return nil
}

// attestOnce runs one attestation and installs the result.
func (a *Agent) attestOnce(ctx context.Context) error {
	conn, err := a.dial(false)
	if err != nil {
		return err
	}
	defer conn.Close()
	res, err := attest.Attest(ctx, agentv1.NewAgentClient(conn), a.tpm, attest.WithLogger(a.log))
	if err != nil {
		return err
	}
	received := time.Now()
	if res.ID.TrustDomain() != a.cfg.TrustDomain {
		res.Key.Close()
		return fmt.Errorf("the server issued %s, outside trust domain %s", res.ID, a.cfg.TrustDomain)
	}
	if err := a.id.setBundle(res.Bundle); err != nil {
		res.Key.Close()
		return err
	}
	if err := a.id.set(res.SVID, res.Key, received); err != nil {
		res.Key.Close()
		return err
	}
	if err := save(a.cfg.DataDir, res.SVID, res.KeyBlob, a.id.bundleCerts()); err != nil {
		// The agent works without the saved copy; it only re-attests on restart.
		a.log.Error("saving the agent identity", "error", err)
	}
	a.log.Info("agent SVID issued", "spiffe_id", res.ID.String(), "ek_hash", res.EKHash,
		"selectors", res.Selectors, "expires", res.SVID[0].NotAfter)
	return nil
}

// refused reports a definitive refusal by the server (as opposed to it
// being unreachable): the node is banned, or its evidence no longer passes.
func refused(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument:
		return true
	}
	return false
}

// attestUntilAdmitted attests, retrying with backoff while the server is
// unreachable or refuses; at first start there is nothing to serve anyway.
func (a *Agent) attestUntilAdmitted(ctx context.Context) error {
	wait := minRetry
	for {
		err := a.attestOnce(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if refused(err) {
			a.log.Error("the server refused attestation", "error", err)
		} else {
			a.log.Warn("attestation failed; retrying", "error", err, "in", wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, maxRetry)
	}
}

// renewLoop re-attests at half of the agent SVID's lifetime, or at once
// when the server refuses the current SVID. If the server refuses the node,
// the agent fails closed: the cache drops every SVID, and it keeps trying
// in case an operator readmits the node.
func (a *Agent) renewLoop(ctx context.Context) {
	wait := minRetry
	for {
		at := a.id.renewTime()
		timer := time.NewTimer(time.Until(at))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		case <-a.reattest:
			timer.Stop()
		}
		a.renewing.Store(true)
		err := a.attestOnce(ctx)
		if err == nil {
			if err := a.connect(); err != nil {
				a.log.Error("reconnecting after re-attestation", "error", err)
			}
			a.renewing.Store(false)
			a.refreshServing()
			// A refusal signalled while attesting concerned the old SVID.
			select {
			case <-a.reattest:
			default:
			}
			wait = minRetry
			continue
		}
		a.renewing.Store(false)
		if ctx.Err() != nil {
			return
		}
		if refused(err) {
			a.log.Error("the server refused re-attestation: no longer serving SVIDs", "error", err)
			a.invalidate("the server refused this node: " + status.Convert(err).Message())
		} else {
			if leaf := a.id.current().Certificates[0]; !time.Now().Before(leaf.NotAfter) && a.mgr.State().Invalidated == "" {
				a.log.Error("the agent SVID expired and could not be renewed: no longer serving SVIDs", "error", err)
				a.invalidate("the agent SVID expired and could not be renewed")
			}
		}
		sleep := wait
		if left := time.Until(a.id.current().Certificates[0].NotAfter); left > 0 && left < sleep {
			// Try once more at expiry, so that a failure then stops the
			// SVIDs on time rather than up to maxRetry later.
			sleep = left
		}
		if !refused(err) {
			a.log.Warn("re-attestation failed; retrying", "error", err, "in", sleep)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(sleep):
		}
		wait = min(wait*2, maxRetry)
		select {
		case a.reattest <- struct{}{}:
		default:
		}
	}
}

// followBundle keeps the trust bundle that authenticates the server in step
// with the one the server sends over Sync (CA rotation), and saves it.
func (a *Agent) followBundle(ctx context.Context) {
	sub, err := a.mgr.Subscribe(ctx, nil)
	if err != nil {
		a.log.Error("following bundle updates", "error", err)
		return
	}
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case snap, ok := <-sub.Updates():
			if !ok {
				return
			}
			if snap == nil || snap.Bundle == nil {
				continue
			}
			certs := snap.Bundle.X509Authorities()
			if len(certs) == 0 {
				continue
			}
			a.id.mu.Lock()
			a.id.bundle = x509bundle.FromX509Authorities(a.cfg.TrustDomain, certs)
			a.id.mu.Unlock()
			if err := writeBundle(a.cfg.DataDir, certs); err != nil {
				a.log.Warn("saving the trust bundle", "error", err)
			}
		}
	}
}

func writeBundle(dir string, certs []*x509.Certificate) error {
	return writeAtomic(filepath.Join(dir, bundleFile), pemCerts(certs))
}

// RunFromArgs parses `ironroot-agent run` flags, loads the configuration and
// runs the agent until ctx ends.
func RunFromArgs(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	var flags config.Flags
	flags.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	cfg, err := config.Load(flags)
	if err != nil {
		return err
	}
	logger, err := newLogger(cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return err
	}
	a, err := New(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer a.Close()
	err = a.Run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
}
