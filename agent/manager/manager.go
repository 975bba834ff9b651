// Package manager is the agent's SVID cache: it follows the server's Sync
// stream, keeps an in-memory key and X509-SVID for every workload entry the
// agent is authorized for, rotates each at half-life, fetches JWT-SVIDs on
// demand, and serves all of it to the Workload API as a workloadapi.Source.
//
// The manager never dials or attests: the agent runtime hands it a connected
// agentv1.AgentClient (mTLS with the agent SVID) and replaces it with
// SetClient after re-attestation. Failing closed is the runtime's decision:
// it calls Invalidate, which drops every SVID at once.
package manager

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/workloadapi"
)

// Defaults for Config.
const (
	// DefaultBatchSize is the number of CSRs per BatchNewX509SVID call.
	DefaultBatchSize = 500
	// MaxBatchSize is the server's limit on CSRs per call.
	MaxBatchSize = 1000
	// DefaultRotationJitter spreads re-signing over ±10 % of the half-life,
	// so SVIDs signed together do not all renew together.
	DefaultRotationJitter = 0.1
	// DefaultJWTCacheSize bounds the JWT-SVID cache (entries × audience sets).
	DefaultJWTCacheSize = 1000
	// DefaultMinBackoff and DefaultMaxBackoff bound the wait before a broken
	// Sync stream is reopened or a failed signing is retried.
	DefaultMinBackoff = 250 * time.Millisecond
	DefaultMaxBackoff = 10 * time.Second
	// DefaultRPCTimeout bounds one signing call to the server.
	DefaultRPCTimeout = 30 * time.Second
)

// serverPath is the path of the server's ID; entries parented to it are node
// aliases, not workload identities.
const serverPath = "/ironroot/server"

// Config configures a Manager.
type Config struct {
	// TrustDomain is the agent's trust domain; bundles and SVIDs of any
	// other trust domain are refused.
	TrustDomain spiffeid.TrustDomain
	// Client is the connected agent API client. It may be nil at New and
	// set later with SetClient.
	Client agentv1.AgentClient
	// Logger defaults to discarding.
	Logger *slog.Logger
	// Clock defaults to time.Now.
	Clock func() time.Time
	// BatchSize is the number of CSRs per BatchNewX509SVID call (default
	// 500, at most 1000).
	BatchSize int
	// RotationJitter is the fraction of the half-life by which re-signing
	// is spread either way (default 0.1, at most 0.5). Negative disables it.
	RotationJitter float64
	// JWTCacheSize bounds the number of cached JWT-SVIDs (default 1000).
	JWTCacheSize int
	// MinBackoff and MaxBackoff bound reconnect and retry waits.
	MinBackoff, MaxBackoff time.Duration
	// RPCTimeout bounds each signing call (default 30 s).
	RPCTimeout time.Duration
	// OnAuthError, if set, is called when the server keeps refusing the
	// agent itself: the Sync stream failed with PermissionDenied or
	// Unauthenticated twice in a row with the same client (the node was
	// banned or evicted, or its SVID is no longer current). A single
	// refusal is not reported: right after a renewal the stream opened
	// with the previous SVID is refused once before SetClient hands over
	// the new client, and reporting it would start another re-attestation.
	// The runtime typically re-attests and calls SetClient, or calls
	// Invalidate if it cannot. It runs on the manager's goroutine and must
	// not block.
	OnAuthError func(error)
}

// State is a summary of the cache for health checks and logs.
type State struct {
	// Entries is the number of workload entries; NodeAliases the number of
	// node-alias entries (parented to the server), which get no SVID.
	Entries, NodeAliases int
	// SVIDs is the number of unexpired cached X509-SVIDs.
	SVIDs int
	// Subscribers is the number of open Workload API subscriptions.
	Subscribers int
	// Connected tells whether the Sync stream is open.
	Connected bool
	// LastSync is when the last Sync message was applied (zero if never).
	LastSync time.Time
	// BundleSequence is the sequence number of the current bundle.
	BundleSequence int64
	// Invalidated is the reason given to Invalidate, empty if the cache is
	// serving.
	Invalidated string
	// LastError describes the last failed Sync or signing call, if any.
	LastError string
}

// Manager is the agent's SVID cache. It implements workloadapi.Source.
type Manager struct {
	cfg      Config
	log      *slog.Logger
	serverID spiffeid.ID
	jwt      *jwtCache
	running  atomic.Bool
	kick     chan struct{} // wakes the signer
	reopen   chan struct{} // tells the sync loop to reopen at once

	usesPath, usesSHA256 atomic.Bool

	mu           sync.Mutex
	client       agentv1.AgentClient
	clientGen    uint64 // bumped by SetClient
	streamCancel context.CancelFunc
	entries      map[string]*entry
	sorted       []*entry // workload entries in snapshot order; nil when stale
	bundle       *spiffebundle.Bundle
	subs         map[*subscriber]struct{}
	epoch        uint64 // bumped by Invalidate; signing results of an older epoch are dropped
	invalid      string
	connected    bool
	lastSync     time.Time
	lastErr      string
	synced       chan struct{}
	syncedOnce   bool
	ready        chan struct{}
	readyOnce    bool
	fullSet      map[string]bool // IDs of a full set still arriving (more)
}

// entry is one registration entry and its cached SVID.
type entry struct {
	id        string
	spiffeID  spiffeid.ID
	parentID  string
	selectors []workloadapi.Selector // sorted, unique
	hint      string
	revision  int64
	workload  bool

	// The cached SVID; certs is nil until the first signing.
	certs          []*x509.Certificate
	key            *ecdsa.PrivateKey
	signedRevision int64
	rotateAt       time.Time
	expiresAt      time.Time
	resign         bool // the bundle no longer holds the SVID's issuer

	failures int
	retryAt  time.Time
}

func (e *entry) hasSVID(now time.Time) bool { return e.certs != nil && now.Before(e.expiresAt) }

type subscriber struct {
	selectors map[workloadapi.Selector]struct{}
	feed      *workloadapi.Feed
	last      *workloadapi.Snapshot
}

// New checks cfg and returns a manager; Run starts it.
func New(cfg Config) (*Manager, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("creating SVID manager: trust domain is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	switch {
	case cfg.BatchSize == 0:
		cfg.BatchSize = DefaultBatchSize
	case cfg.BatchSize < 0 || cfg.BatchSize > MaxBatchSize:
		return nil, fmt.Errorf("creating SVID manager: batch size %d is not between 1 and %d", cfg.BatchSize, MaxBatchSize)
	}
	switch {
	case cfg.RotationJitter == 0:
		cfg.RotationJitter = DefaultRotationJitter
	case cfg.RotationJitter < 0:
		cfg.RotationJitter = 0
	case cfg.RotationJitter > 0.5:
		return nil, fmt.Errorf("creating SVID manager: rotation jitter %.2f is above 0.5", cfg.RotationJitter)
	}
	if cfg.JWTCacheSize <= 0 {
		cfg.JWTCacheSize = DefaultJWTCacheSize
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(DefaultMaxBackoff, cfg.MinBackoff)
	}
	if cfg.RPCTimeout <= 0 {
		cfg.RPCTimeout = DefaultRPCTimeout
	}
	serverID, err := spiffeid.FromPath(cfg.TrustDomain, serverPath)
	if err != nil {
		return nil, fmt.Errorf("creating SVID manager: server ID: %w", err)
	}
	return &Manager{
		cfg:      cfg,
		log:      cfg.Logger,
		serverID: serverID,
		jwt:      newJWTCache(cfg.JWTCacheSize),
		kick:     make(chan struct{}, 1),
		reopen:   make(chan struct{}, 1),
		client:   cfg.Client,
		entries:  make(map[string]*entry),
		subs:     make(map[*subscriber]struct{}),
		synced:   make(chan struct{}),
		ready:    make(chan struct{}),
	}, nil
}

// Run follows the Sync stream and keeps the SVIDs signed until ctx ends. It
// returns nil when ctx ends; it may be called only once.
func (m *Manager) Run(ctx context.Context) error {
	if !m.running.CompareAndSwap(false, true) {
		return errors.New("SVID manager is already running")
	}
	var wg sync.WaitGroup
	wg.Go(func() { m.syncLoop(ctx) })
	wg.Go(func() { m.signLoop(ctx) })
	wg.Wait()
	return nil
}

// SetClient replaces the agent API client (after re-attestation), lifts an
// Invalidate, and reopens the Sync stream with the new client at once.
// Cached SVIDs stay until the new full sync says otherwise.
func (m *Manager) SetClient(c agentv1.AgentClient) {
	m.mu.Lock()
	m.client = c
	m.clientGen++
	m.invalid = ""
	for _, e := range m.entries {
		e.failures, e.retryAt = 0, time.Time{} // the new client deserves a try at once
	}
	if m.streamCancel != nil {
		m.streamCancel()
	}
	m.mu.Unlock()
	signal(m.reopen)
	signal(m.kick)
}

// Invalidate drops every entry, SVID and cached JWT-SVID and stops syncing
// until SetClient: the agent is no longer entitled to them (its node was
// banned or failed re-attestation). Subscribers get an empty snapshot at
// once, which the Workload API answers with PermissionDenied.
func (m *Manager) Invalidate(reason string) {
	if reason == "" {
		reason = "invalidated"
	}
	m.mu.Lock()
	m.invalid = reason
	m.epoch++
	clear(m.entries)
	m.fullSet = nil
	m.sorted = nil
	m.connected = false
	if m.streamCancel != nil {
		m.streamCancel()
	}
	m.updateSelectorUseLocked()
	m.publishLocked()
	m.mu.Unlock()
	m.jwt.clear()
	m.log.Warn("SVID cache invalidated: workloads get no identities until the agent is re-attested", "reason", reason)
}

// Synced is closed once the first full Sync has been applied.
func (m *Manager) Synced() <-chan struct{} { return m.synced }

// Ready is closed once the first full Sync has been applied and every entry
// in it has been through one signing attempt. The runtime should start the
// Workload API after Ready: a workload that connects earlier is told
// PermissionDenied and backs off (go-spiffe waits a second or more).
func (m *Manager) Ready() <-chan struct{} { return m.ready }

// State returns a summary of the cache.
func (m *Manager) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock()
	s := State{
		Subscribers: len(m.subs),
		Connected:   m.connected,
		LastSync:    m.lastSync,
		Invalidated: m.invalid,
		LastError:   m.lastErr,
	}
	if m.bundle != nil {
		if seq, ok := m.bundle.SequenceNumber(); ok {
			s.BundleSequence = int64(seq)
		}
	}
	for _, e := range m.entries {
		if !e.workload {
			s.NodeAliases++
			continue
		}
		s.Entries++
		if e.hasSVID(now) {
			s.SVIDs++
		}
	}
	return s
}

// UsesPathSelectors reports whether any workload entry has a unix:path
// selector; it fits the unix attestor's WithPathSelectors.
func (m *Manager) UsesPathSelectors() bool { return m.usesPath.Load() }

// UsesSHA256Selectors reports whether any workload entry has a unix:sha256
// selector; it fits the unix attestor's WithSHA256Selectors.
func (m *Manager) UsesSHA256Selectors() bool { return m.usesSHA256.Load() }

// Subscribe implements workloadapi.Source: the snapshot holds the SVIDs of
// every workload entry whose selectors are all among selectors, ordered by
// SPIFFE ID then entry ID (the first is the default), and the bundle.
func (m *Manager) Subscribe(_ context.Context, selectors []workloadapi.Selector) (workloadapi.Subscription, error) {
	sub := &subscriber{selectors: selectorSet(selectors)}
	m.mu.Lock()
	defer m.mu.Unlock()
	sub.last = m.snapshotLocked(sub.selectors, m.cfg.Clock())
	sub.feed = workloadapi.NewFeed(sub.last, func() {
		m.mu.Lock()
		delete(m.subs, sub)
		m.mu.Unlock()
	})
	m.subs[sub] = struct{}{}
	return sub.feed, nil
}

func selectorSet(sels []workloadapi.Selector) map[workloadapi.Selector]struct{} {
	set := make(map[workloadapi.Selector]struct{}, len(sels))
	for _, s := range sels {
		set[s] = struct{}{}
	}
	return set
}

// matches tells whether an entry applies to a workload: every selector of
// the entry is one of the workload's. An entry with no selectors matches
// nothing.
func matches(entrySels []workloadapi.Selector, workload map[workloadapi.Selector]struct{}) bool {
	if len(entrySels) == 0 {
		return false
	}
	for _, s := range entrySels {
		if _, ok := workload[s]; !ok {
			return false
		}
	}
	return true
}

// sortedLocked returns the workload entries in snapshot order.
func (m *Manager) sortedLocked() []*entry {
	if m.sorted != nil {
		return m.sorted
	}
	out := make([]*entry, 0, len(m.entries))
	for _, e := range m.entries {
		if e.workload {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b *entry) int {
		if c := strings.Compare(a.spiffeID.String(), b.spiffeID.String()); c != 0 {
			return c
		}
		return strings.Compare(a.id, b.id)
	})
	m.sorted = out
	return out
}

func (m *Manager) snapshotLocked(sels map[workloadapi.Selector]struct{}, now time.Time) *workloadapi.Snapshot {
	snap := &workloadapi.Snapshot{Bundle: m.bundle}
	if m.invalid != "" {
		return snap
	}
	for _, e := range m.sortedLocked() {
		if !e.hasSVID(now) || !matches(e.selectors, sels) {
			continue
		}
		snap.SVIDs = append(snap.SVIDs, workloadapi.X509SVID{ID: e.spiffeID, Certificates: e.certs, PrivateKey: e.key, Hint: e.hint})
	}
	return snap
}

// publishLocked pushes a new snapshot to every subscriber whose state
// changed.
func (m *Manager) publishLocked() {
	now := m.cfg.Clock()
	for sub := range m.subs {
		snap := m.snapshotLocked(sub.selectors, now)
		if sameSnapshot(sub.last, snap) {
			continue
		}
		sub.last = snap
		sub.feed.Push(snap)
	}
}

// sameSnapshot compares by identity: a re-signed SVID has new certificates.
func sameSnapshot(a, b *workloadapi.Snapshot) bool {
	if a == nil || b == nil || a.Bundle != b.Bundle || len(a.SVIDs) != len(b.SVIDs) {
		return false
	}
	for i := range a.SVIDs {
		x, y := a.SVIDs[i], b.SVIDs[i]
		if x.ID != y.ID || x.Hint != y.Hint || len(x.Certificates) == 0 || len(y.Certificates) == 0 || x.Certificates[0] != y.Certificates[0] {
			return false
		}
	}
	return true
}

func (m *Manager) updateSelectorUseLocked() {
	var path, sha bool
	for _, e := range m.entries {
		if !e.workload {
			continue
		}
		for _, s := range e.selectors {
			if s.Type != "unix" {
				continue
			}
			path = path || strings.HasPrefix(s.Value, "path:")
			sha = sha || strings.HasPrefix(s.Value, "sha256:")
		}
	}
	m.usesPath.Store(path)
	m.usesSHA256.Store(sha)
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// backoff returns the wait after n consecutive failures.
func (m *Manager) backoff(n int) time.Duration {
	d := m.cfg.MinBackoff
	for i := 1; i < n && d < m.cfg.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, m.cfg.MaxBackoff)
}

// sleep waits d or until ctx ends or wake fires; it reports whether ctx is
// still live.
func sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-t.C:
	}
	return true
}

// newKeyAndCSR makes the in-memory workload key and a CSR for it. The CSR
// carries no names: the server takes the identity from the entry.
func newKeyAndCSR() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating workload key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating workload CSR: %w", err)
	}
	return key, csr, nil
}

// rotationTime picks when to re-sign: at half-life, moved by up to ±jitter
// of the half-life.
func (m *Manager) rotationTime(notBefore, notAfter time.Time) time.Time {
	half := notAfter.Sub(notBefore) / 2
	if j := m.cfg.RotationJitter; j > 0 {
		half += time.Duration((mrand.Float64()*2 - 1) * j * float64(half))
	}
	return notBefore.Add(half)
}

// isAuthError tells whether the server refused the agent itself.
func isAuthError(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated:
		return true
	}
	return false
}

// codeOf converts a wire status code, treating unknown values as Unknown.
func codeOf(s *agentv1.Status) codes.Code {
	if s == nil {
		return codes.Unknown
	}
	if s.Code < 0 || s.Code > int32(codes.Unauthenticated) {
		return codes.Unknown
	}
	return codes.Code(s.Code)
}
