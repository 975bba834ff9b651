package manager

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
)

// parallelBatches bounds the BatchNewX509SVID calls in flight.
const parallelBatches = 2

// idleWait is how long the signer sleeps when nothing is scheduled; a kick
// wakes it earlier.
const idleWait = time.Hour

// job is one entry to sign: the revision asked for, so a result for an
// entry that changed meanwhile is dropped.
type job struct {
	id       string
	revision int64
	key      *ecdsa.PrivateKey
	csr      []byte
}

// signLoop signs whatever is due, then sleeps until the next rotation,
// expiry or retry, or until the sync loop reports a change.
func (m *Manager) signLoop(ctx context.Context) {
	for ctx.Err() == nil {
		due, client, epoch, next := m.due()
		if len(due) > 0 && client != nil {
			// A couple of batches in flight overlap key generation here
			// with signing on the server.
			sem := make(chan struct{}, parallelBatches)
			var wg sync.WaitGroup
			for start := 0; start < len(due) && ctx.Err() == nil; start += m.cfg.BatchSize {
				batch := due[start:min(start+m.cfg.BatchSize, len(due))]
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					m.signBatch(ctx, client, epoch, batch)
				})
			}
			wg.Wait()
			continue
		}
		m.markReady()
		wait := idleWait
		if !next.IsZero() {
			wait = max(next.Sub(m.cfg.Clock()), time.Millisecond)
		}
		if !sleep(ctx, wait, m.kick) {
			return
		}
	}
}

// markReady closes Ready after the first full sync has been signed.
func (m *Manager) markReady() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.syncedOnce && !m.readyOnce {
		m.readyOnce = true
		close(m.ready)
	}
}

// due returns the entries to sign now and the earliest future time at which
// something is due. It also drops expired SVIDs and tells subscribers.
func (m *Manager) due() (due []job, client agentv1.AgentClient, epoch uint64, next time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock()
	if m.invalid != "" {
		return nil, nil, 0, time.Time{}
	}
	consider := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	expired := false
	for _, e := range m.entries {
		if !e.workload {
			continue
		}
		if e.certs != nil && !now.Before(e.expiresAt) {
			// Renewal kept failing: an expired SVID is worse than none.
			e.certs, e.key = nil, nil
			expired = true
			m.log.Warn("X509-SVID expired before it could be renewed", "entry", e.id, "spiffe_id", e.spiffeID.String())
		}
		if e.certs != nil {
			consider(e.expiresAt) // to drop it then if renewal keeps failing
		}
		needs := e.certs == nil || e.resign || e.signedRevision != e.revision || !now.Before(e.rotateAt)
		switch {
		case !needs:
			consider(e.rotateAt)
		case now.Before(e.retryAt):
			consider(e.retryAt)
		default:
			due = append(due, job{id: e.id, revision: e.revision})
		}
	}
	if expired {
		m.publishLocked()
	}
	return due, m.client, m.epoch, next
}

// signBatch makes keys and CSRs for jobs, has the server sign them in one
// call, and caches the results.
func (m *Manager) signBatch(ctx context.Context, client agentv1.AgentClient, epoch uint64, jobs []job) {
	req := &agentv1.BatchNewX509SVIDRequest{Params: make([]*agentv1.X509SVIDParams, 0, len(jobs))}
	for i := range jobs {
		key, csr, err := newKeyAndCSR()
		if err != nil {
			m.failJobs(jobs, fmt.Errorf("preparing CSRs: %w", err))
			return
		}
		jobs[i].key, jobs[i].csr = key, csr
		req.Params = append(req.Params, &agentv1.X509SVIDParams{EntryId: jobs[i].id, Csr: csr})
	}
	requested := m.cfg.Clock()
	cctx, cancel := context.WithTimeout(ctx, m.cfg.RPCTimeout)
	resp, err := client.BatchNewX509SVID(cctx, req)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			// Not reported to OnAuthError: a refused agent is refused on
			// Sync too, and a call on a connection that SetClient is just
			// replacing must not trigger another re-attestation.
			m.failJobs(jobs, fmt.Errorf("requesting %d X509-SVIDs: %w", len(jobs), err))
		}
		return
	}
	if len(resp.Results) != len(jobs) {
		m.failJobs(jobs, fmt.Errorf("server answered %d results for %d CSRs", len(resp.Results), len(jobs)))
		return
	}

	type signed struct {
		certs []*x509.Certificate
		err   error
	}
	out := make([]signed, len(jobs))
	m.mu.Lock()
	ids := make([]spiffeid.ID, len(jobs))
	for i, j := range jobs {
		if e, ok := m.entries[j.id]; ok {
			ids[i] = e.spiffeID
		}
	}
	m.mu.Unlock()
	for i, r := range resp.Results {
		if c := codeOf(r.Status); c != codes.OK {
			out[i].err = fmt.Errorf("server refused the CSR: %s: %s", c, r.Status.GetMessage())
			continue
		}
		out[i].certs, out[i].err = parseSVID(r.Svid, ids[i], &jobs[i].key.PublicKey)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.epoch != epoch || m.invalid != "" {
		return // Invalidate ran meanwhile: these SVIDs are no longer ours to give
	}
	now := m.cfg.Clock()
	changed := 0
	for i, j := range jobs {
		e, ok := m.entries[j.id]
		if !ok || e.revision != j.revision {
			continue // deleted or changed meanwhile; a newer job follows
		}
		if out[i].err != nil {
			retry := m.failLocked(e, now, out[i].err)
			m.log.Warn("X509-SVID signing failed; retrying", "entry", e.id, "spiffe_id", e.spiffeID.String(), "error", out[i].err, "retry_at", retry)
			continue
		}
		leaf := out[i].certs[0]
		e.certs, e.key = out[i].certs, j.key
		e.signedRevision, e.resign = j.revision, false
		e.expiresAt = leaf.NotAfter
		// Half-life counts from the request, not from NotBefore: the server
		// backdates NotBefore, which would make short TTLs renew at once.
		e.rotateAt = m.rotationTime(later(leaf.NotBefore, requested), leaf.NotAfter)
		e.rotateAt = later(e.rotateAt, now.Add(m.cfg.MinBackoff))
		e.failures, e.retryAt = 0, time.Time{}
		changed++
	}
	if changed > 0 {
		m.log.Debug("X509-SVIDs signed", "count", changed)
		m.publishLocked()
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// parseSVID checks a signed SVID: its chain parses, the leaf names the
// entry's SPIFFE ID and holds the key the CSR was made for.
func parseSVID(svid *agentv1.X509SVID, want spiffeid.ID, pub *ecdsa.PublicKey) ([]*x509.Certificate, error) {
	if svid == nil || len(svid.CertChain) == 0 {
		return nil, errors.New("server returned no certificate")
	}
	certs := make([]*x509.Certificate, 0, len(svid.CertChain))
	for i, der := range svid.CertChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate %d of the SVID chain: %w", i, err)
		}
		certs = append(certs, c)
	}
	leaf := certs[0]
	if len(leaf.URIs) != 1 {
		return nil, errors.New("SVID leaf does not have exactly one URI SAN")
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("SVID leaf URI SAN: %w", err)
	}
	if id != want {
		return nil, fmt.Errorf("server signed %s for an entry with SPIFFE ID %s", id, want)
	}
	if lk, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !lk.Equal(pub) {
		return nil, errors.New("SVID leaf does not hold the requested key")
	}
	if !leaf.NotAfter.After(leaf.NotBefore) {
		return nil, errors.New("SVID leaf has an empty validity period")
	}
	return certs, nil
}

// failJobs schedules a retry of every job after a failed call.
func (m *Manager) failJobs(jobs []job, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock()
	var retry time.Time
	for _, j := range jobs {
		if e, ok := m.entries[j.id]; ok && e.revision == j.revision {
			retry = m.failLocked(e, now, err)
		}
	}
	m.log.Warn("X509-SVID signing failed; retrying", "entries", len(jobs), "error", err, "retry_at", retry)
}

func (m *Manager) failLocked(e *entry, now time.Time, err error) time.Time {
	e.failures++
	e.retryAt = now.Add(m.backoff(e.failures))
	m.lastErr = "signing: " + err.Error()
	return e.retryAt
}
