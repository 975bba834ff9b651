package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
)

// Defaults for the options.
const (
	// DefaultMaxRecvMessageSize bounds requests; Workload API requests are
	// tiny (the largest is a JWT to validate).
	DefaultMaxRecvMessageSize = 1 << 20
	// DefaultMaxSendMessageSize bounds responses. go-spiffe clients accept
	// 4 MiB by default, which is about 1,500 X509-SVIDs.
	DefaultMaxSendMessageSize = 64 << 20
	// DefaultStopGracePeriod is how long Serve waits for in-flight unary
	// RPCs after its context ends before closing connections.
	DefaultStopGracePeriod = 5 * time.Second
)

// serviceName is the gRPC service name: workload.proto has no package.
const serviceName = "SpiffeWorkloadAPI"

// Option configures a Server.
type Option func(*config)

type config struct {
	log                  *slog.Logger
	allowUnauthVerifiers bool
	maxRecv, maxSend     int
	grace                time.Duration
}

// WithLogger sets the logger; the default discards.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) {
		if l != nil {
			c.log = l
		}
	}
}

// WithAllowUnauthenticatedVerifiers lets callers with no identity fetch
// bundles (FetchX509Bundles, FetchJWTBundles), like SPIRE's
// allow_unauthenticated_verifiers. Off by default: such callers get
// PermissionDenied.
func WithAllowUnauthenticatedVerifiers(allow bool) Option {
	return func(c *config) { c.allowUnauthVerifiers = allow }
}

// WithMaxMessageSize sets the largest request and response the server
// accepts and sends, in bytes. Non-positive values keep the defaults.
func WithMaxMessageSize(recv, send int) Option {
	return func(c *config) {
		if recv > 0 {
			c.maxRecv = recv
		}
		if send > 0 {
			c.maxSend = send
		}
	}
}

// WithStopGracePeriod sets how long a stopping server waits for in-flight
// unary RPCs before it closes connections.
func WithStopGracePeriod(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.grace = d
		}
	}
}

// Server is a SPIFFE Workload API server.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer

	attestor Attestor
	source   Source
	cfg      config

	grpc   *grpc.Server
	health *health.Server

	stopOnce sync.Once
	done     chan struct{} // closed when the server stops; ends streams
}

// New returns a server that identifies callers with attestor and serves the
// identities of source.
func New(attestor Attestor, source Source, opts ...Option) (*Server, error) {
	if attestor == nil {
		return nil, errors.New("creating workload API server: no attestor")
	}
	if source == nil {
		return nil, errors.New("creating workload API server: no identity source")
	}
	cfg := config{
		log:     slog.New(slog.DiscardHandler),
		maxRecv: DefaultMaxRecvMessageSize,
		maxSend: DefaultMaxSendMessageSize,
		grace:   DefaultStopGracePeriod,
	}
	for _, o := range opts {
		o(&cfg)
	}
	s := &Server{attestor: attestor, source: source, cfg: cfg, done: make(chan struct{})}
	s.grpc = grpc.NewServer(
		grpc.Creds(PeerCredentials()),
		grpc.MaxRecvMsgSize(cfg.maxRecv),
		grpc.MaxSendMsgSize(cfg.maxSend),
		grpc.UnaryInterceptor(unaryHeaderCheck),
		grpc.StreamInterceptor(streamHeaderCheck),
	)
	workload.RegisterSpiffeWorkloadAPIServer(s.grpc, s)
	s.health = health.NewServer()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(serviceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	return s, nil
}

// SetServing sets what the gRPC health service on the socket reports:
// SERVING, or NOT_SERVING while the agent has no identities to hand out
// (before its first sync, or after its cache was invalidated), so that
// `ironroot-agent healthcheck` and orchestrator probes see it. New servers
// report SERVING.
func (s *Server) SetServing(serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	// After Stop the health server has shut down and ignores this.
	s.health.SetServingStatus("", st)
	s.health.SetServingStatus(serviceName, st)
}

// Serve answers Workload API calls on lis until ctx ends or serving fails,
// then stops gracefully: open streams end with Unavailable (clients
// reconnect to the next server) and unary RPCs get the grace period.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(lis) }()
	select {
	case err := <-errc:
		s.Stop()
		if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("serving workload API: %w", err)
		}
		return nil
	case <-ctx.Done():
		s.Stop()
		<-errc
		return nil
	}
}

// ListenAndServe listens on the unix socket socketPath (see Listen) and
// serves until ctx ends. Closing the listener removes the socket file.
func (s *Server) ListenAndServe(ctx context.Context, socketPath string) error {
	lis, err := Listen(socketPath)
	if err != nil {
		return err
	}
	s.cfg.log.Info("workload API listening", "socket", socketPath)
	return s.Serve(ctx, lis)
}

// Stop stops the server gracefully: streams end at once with Unavailable,
// in-flight unary RPCs get the grace period, then connections are closed.
// It is safe to call more than once.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		s.health.Shutdown()
		close(s.done)
		finished := make(chan struct{})
		go func() {
			s.grpc.GracefulStop()
			close(finished)
		}()
		t := time.NewTimer(s.cfg.grace)
		defer t.Stop()
		select {
		case <-finished:
		case <-t.C:
			s.grpc.Stop()
			<-finished
		}
	})
}

// Listen creates the unix socket socketPath for the Workload API: it creates
// the directory if missing (mode 0755), removes a stale socket left by a
// previous run (but nothing that is not a socket), and makes the socket
// mode 0777, as SPIRE does: callers are identified by kernel credentials, not
// by file permissions.
func Listen(socketPath string) (net.Listener, error) {
	if socketPath == "" {
		return nil, errors.New("listening for workload API: empty socket path")
	}
	if err := os.MkdirAll(filepath.Dir(socketPath), 0o755); err != nil {
		return nil, fmt.Errorf("creating workload API socket directory: %w", err)
	}
	if fi, err := os.Lstat(socketPath); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listening for workload API: %s exists and is not a socket", socketPath)
		}
		// A live server still answering there would lose its socket; refuse.
		if c, err := net.DialTimeout("unix", socketPath, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listening for workload API: %s is in use by another server", socketPath)
		}
		if err := os.Remove(socketPath); err != nil {
			return nil, fmt.Errorf("removing stale workload API socket: %w", err)
		}
	}
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening for workload API on %s: %w", socketPath, err)
	}
	if err := os.Chmod(socketPath, 0o777); err != nil {
		lis.Close()
		os.Remove(socketPath)
		return nil, fmt.Errorf("setting workload API socket mode: %w", err)
	}
	return lis, nil
}
