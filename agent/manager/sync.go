package manager

import (
	"bytes"
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/workloadapi"
)

// syncLoop keeps a Sync stream open, reopening it with backoff.
func (m *Manager) syncLoop(ctx context.Context) {
	failures, authFailures := 0, 0
	var authGen uint64
	for ctx.Err() == nil {
		m.mu.Lock()
		client, invalid, gen := m.client, m.invalid, m.clientGen
		sctx, cancel := context.WithCancel(ctx)
		m.streamCancel = cancel
		m.mu.Unlock()
		if client == nil || invalid != "" {
			cancel()
			// Nothing to do until SetClient.
			select {
			case <-ctx.Done():
				return
			case <-m.reopen:
			}
			continue
		}
		received, err := m.follow(sctx, client)
		replaced := sctx.Err() != nil // SetClient or Invalidate cancelled the stream
		cancel()
		if ctx.Err() != nil {
			return
		}
		m.mu.Lock()
		m.connected = false
		// follow only returns when the stream broke, with why.
		if !replaced {
			m.lastErr = "sync: " + err.Error()
		}
		m.mu.Unlock()
		if received {
			failures, authFailures = 0, 0
		}
		failures++
		if replaced {
			continue
		}
		if isAuthError(err) {
			if authGen != gen {
				authGen, authFailures = gen, 0
			}
			if authFailures++; authFailures == 2 && m.cfg.OnAuthError != nil {
				m.cfg.OnAuthError(err)
			}
		}
		wait := m.backoff(failures)
		m.log.Warn("sync stream with the server ended; reconnecting", "error", err, "retry_in", wait)
		if !sleep(ctx, wait, m.reopen) {
			return
		}
	}
}

// follow reads one Sync stream until it breaks. received tells whether a
// message was applied (the connection worked, so backoff restarts).
func (m *Manager) follow(ctx context.Context, client agentv1.AgentClient) (received bool, err error) {
	stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		return false, fmt.Errorf("opening sync stream: %w", err)
	}
	for first := true; ; first = false {
		resp, err := stream.Recv()
		if err != nil {
			return received, fmt.Errorf("receiving from sync stream: %w", err)
		}
		if first && !resp.Full {
			return received, errors.New("sync stream did not start with the full entry set")
		}
		if err := m.apply(ctx, resp); err != nil {
			return received, err
		}
		received = true
	}
}

// apply applies one Sync message, then wakes the signer and pushes the
// changes (deletions and bundle updates) to subscribers.
func (m *Manager) apply(ctx context.Context, resp *agentv1.SyncResponse) error {
	var bundle *spiffebundle.Bundle
	if resp.Bundle != nil {
		b, err := BundleFromProto(m.cfg.TrustDomain, resp.Bundle)
		if err != nil {
			return fmt.Errorf("applying sync message: %w", err)
		}
		bundle = b
	}
	incoming := make([]*entry, 0, len(resp.Upserted))
	var unusable []string
	for _, pe := range resp.Upserted {
		e, err := m.entryFromProto(pe)
		if err != nil {
			// One bad entry must not cost the others their SVIDs; an
			// older, valid version of it is dropped all the same.
			m.log.Error("ignoring invalid entry from the server", "entry", pe.GetId(), "error", err)
			unusable = append(unusable, pe.GetId())
			continue
		}
		incoming = append(incoming, e)
	}

	m.mu.Lock()
	if ctx.Err() != nil {
		// Invalidate or SetClient ran since the message was read.
		m.mu.Unlock()
		return ctx.Err()
	}
	var dropped []string
	if resp.Full {
		// The server may split a large full set over several messages:
		// the first says full, every part but the last says more.
		m.fullSet = make(map[string]bool, len(incoming))
	}
	if m.fullSet != nil {
		for _, e := range incoming {
			m.fullSet[e.id] = true
		}
		if !resp.More {
			for id := range m.entries {
				if !m.fullSet[id] {
					delete(m.entries, id)
					dropped = append(dropped, id)
				}
			}
			m.fullSet = nil
		}
	}
	for _, id := range slices.Concat(resp.DeletedIds, unusable) {
		if _, ok := m.entries[id]; ok {
			delete(m.entries, id)
			dropped = append(dropped, id)
		}
	}
	for _, e := range incoming {
		if old, ok := m.entries[e.id]; ok {
			// Keep the SVID; a new revision makes the signer re-sign it.
			e.certs, e.key, e.signedRevision = old.certs, old.key, old.signedRevision
			e.rotateAt, e.expiresAt, e.resign = old.rotateAt, old.expiresAt, old.resign
			if e.revision != old.revision {
				dropped = append(dropped, e.id) // cached JWT-SVIDs may name old claims
			}
		}
		m.entries[e.id] = e
	}
	if bundle != nil && (m.bundle == nil || !m.bundle.Equal(bundle)) {
		m.bundle = bundle
		m.markUntrustedLocked()
	}
	m.sorted = nil
	m.connected = true
	m.lastErr = ""
	m.lastSync = m.cfg.Clock()
	if resp.Full && !m.syncedOnce {
		m.syncedOnce = true
		close(m.synced)
	}
	m.updateSelectorUseLocked()
	m.publishLocked()
	m.mu.Unlock()

	m.jwt.dropEntries(dropped)
	signal(m.kick)
	return nil
}

// markUntrustedLocked flags SVIDs whose issuer left the bundle (CA rotation
// without overlap) for re-signing at once.
func (m *Manager) markUntrustedLocked() {
	auths := m.bundle.X509Authorities()
	for _, e := range m.entries {
		if e.certs == nil {
			continue
		}
		top := e.certs[len(e.certs)-1]
		if !slices.ContainsFunc(auths, func(a *x509.Certificate) bool { return issuedBy(top, a) }) {
			e.resign = true
		}
	}
}

func issuedBy(c, ca *x509.Certificate) bool {
	if len(c.AuthorityKeyId) > 0 && len(ca.SubjectKeyId) > 0 {
		return bytes.Equal(c.AuthorityKeyId, ca.SubjectKeyId)
	}
	return bytes.Equal(c.RawIssuer, ca.RawSubject)
}

func (m *Manager) entryFromProto(pe *agentv1.Entry) (*entry, error) {
	if pe.GetId() == "" {
		return nil, errors.New("entry has no ID")
	}
	id, err := spiffeid.FromString(pe.SpiffeId)
	if err != nil {
		return nil, fmt.Errorf("entry SPIFFE ID: %w", err)
	}
	if id.TrustDomain() != m.cfg.TrustDomain {
		return nil, fmt.Errorf("entry SPIFFE ID %s is outside trust domain %s", id, m.cfg.TrustDomain)
	}
	e := &entry{
		id:       pe.Id,
		spiffeID: id,
		parentID: pe.ParentId,
		hint:     pe.Hint,
		revision: pe.RevisionNumber,
		workload: pe.ParentId != m.serverID.String(),
	}
	for _, s := range pe.Selectors {
		if s.GetType() == "" || s.GetValue() == "" {
			return nil, errors.New("entry has an empty selector")
		}
		e.selectors = append(e.selectors, workloadapi.Selector{Type: s.Type, Value: s.Value})
	}
	slices.SortFunc(e.selectors, func(a, b workloadapi.Selector) int {
		return cmp.Or(strings.Compare(a.Type, b.Type), strings.Compare(a.Value, b.Value))
	})
	e.selectors = slices.Compact(e.selectors)
	return e, nil
}

// BundleFromProto converts a bundle from the agent API, refusing one of
// another trust domain or with unparsable authorities.
func BundleFromProto(td spiffeid.TrustDomain, pb *agentv1.Bundle) (*spiffebundle.Bundle, error) {
	if pb.GetTrustDomain() != td.Name() {
		return nil, fmt.Errorf("bundle is for trust domain %q, not %q", pb.GetTrustDomain(), td.Name())
	}
	if len(pb.X509Authorities) == 0 {
		return nil, errors.New("bundle has no X.509 authorities")
	}
	b := spiffebundle.New(td)
	for i, der := range pb.X509Authorities {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parsing bundle X.509 authority %d: %w", i, err)
		}
		b.AddX509Authority(c)
	}
	for _, a := range pb.JwtAuthorities {
		if a.GetKeyId() == "" {
			return nil, errors.New("bundle JWT authority has no key ID")
		}
		pub, err := x509.ParsePKIXPublicKey(a.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("parsing bundle JWT authority %q: %w", a.KeyId, err)
		}
		if err := b.AddJWTAuthority(a.KeyId, pub); err != nil {
			return nil, fmt.Errorf("adding bundle JWT authority %q: %w", a.KeyId, err)
		}
	}
	b.SetSequenceNumber(uint64(max(pb.SequenceNumber, 0)))
	if pb.RefreshHintSeconds > 0 {
		b.SetRefreshHint(time.Duration(pb.RefreshHintSeconds) * time.Second)
	}
	return b, nil
}
