package agentapi

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
)

// MaxSyncMessageBytes bounds one SyncResponse. A change set larger than
// this (an agent authorized for more than roughly 8,000 entries) is split
// over several messages sent back to back: the first carries full (on
// connect) and the bundle, the rest only further upserted entries and
// deleted IDs. It stays well under gRPC's default 4 MiB receive limit.
const MaxSyncMessageBytes = 2 << 20

// perItemOverhead over-approximates the tag and length prefix of one
// repeated field element, so a message never exceeds its budget.
const perItemOverhead = 8

// Sync streams the entries the calling agent is authorized for: the full
// set with the bundle on connect, then, as each change is committed, the
// upserted entries and deleted IDs, and the bundle whenever its sequence
// number changes. It waits on the entry cache's and the CA's signals and
// never polls; the entry cache signals after it applied node events too,
// and tells which nodes changed, so a ban, an eviction or a re-attestation
// of the caller ends the stream with PermissionDenied naming the reason. The
// stream also ends, Unauthenticated, when the agent SVID it was opened with
// expires.
func (s *Service) Sync(_ *agentv1.SyncRequest, stream agentv1.Agent_SyncServer) error {
	ctx := stream.Context()
	select {
	case <-s.stopping:
		return status.Error(codes.Unavailable, "the server is shutting down")
	default:
	}
	// Subscribe before the node record and the entries are read, so a
	// change committed in between wakes the loop instead of being missed.
	entriesCh, cancelEntries := s.cfg.Entries.Subscribe()
	defer cancelEntries()
	bundleCh, cancelBundle := s.cfg.CA.SubscribeBundle()
	defer cancelBundle()
	// The cache revision before authenticate reads the node record: a node
	// change that read missed is applied to the cache later, at a higher
	// revision, so comparing NodeRevision with it never misses one.
	nodeChecked := s.cfg.Entries.Revision()
	c, err := s.authenticate(ctx)
	if err != nil {
		return err
	}

	expiry := time.NewTimer(max(c.cert.NotAfter.Sub(s.cfg.Clock()), 0))
	defer expiry.Stop()

	node := c.node
	set := newAgentSet(s.cfg.Entries, c.id, node.Selectors)
	current := set.entries()
	b := s.cfg.CA.Bundle()
	pb, err := ToProtoBundle(b)
	if err != nil {
		return status.Errorf(codes.Internal, "encoding the bundle: %v", err)
	}
	bundleSeq := b.Sequence
	upserted := make([]*agentv1.Entry, 0, len(current))
	for _, e := range current {
		upserted = append(upserted, ToProtoEntry(e))
	}
	if err := sendAll(stream, syncMessages(true, upserted, nil, pb, MaxSyncMessageBytes)); err != nil {
		return err
	}
	s.log.Debug("sync stream opened", "agent", c.id.String(), "entries", len(current))

	for {
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-s.stopping:
			return status.Error(codes.Unavailable, "the server is shutting down")
		case <-expiry.C:
			return status.Errorf(codes.Unauthenticated, "agent %s: the SVID this stream was opened with has expired", c.id)
		case <-entriesCh:
		case <-bundleCh:
		}
		// Both signals coalesce and one pass handles everything, so take
		// whichever else is pending now rather than waking again for it.
		drain(entriesCh)
		drain(bundleCh)

		// Re-read the node record only when the cache saw it change: with
		// thousands of streams, one query each per commit adds up.
		nodeChanged := false
		if s.cfg.Entries.NodeRevision(c.id.String()) > nodeChecked {
			rev := s.cfg.Entries.Revision()
			if node, err = s.recheckNode(ctx, c); err != nil {
				return err
			}
			nodeChecked = rev
			// Attestation always issues a new SVID (ending the stream), but
			// recompute in full should selectors ever change without one.
			nodeChanged = !slices.Equal(node.Selectors, set.sels)
		}
		var (
			msgUpserted []*agentv1.Entry
			msgDeleted  []string
			msgBundle   *agentv1.Bundle
		)
		upserted, removed := set.advance(node.Selectors, nodeChanged)
		for _, e := range upserted {
			msgUpserted = append(msgUpserted, ToProtoEntry(e))
		}
		for _, e := range removed {
			msgDeleted = append(msgDeleted, e.ID)
		}
		if b := s.cfg.CA.Bundle(); b.Sequence != bundleSeq {
			if msgBundle, err = ToProtoBundle(b); err != nil {
				return status.Errorf(codes.Internal, "encoding the bundle: %v", err)
			}
			bundleSeq = b.Sequence
		}
		if len(msgUpserted) == 0 && len(msgDeleted) == 0 && msgBundle == nil {
			continue
		}
		if err := sendAll(stream, syncMessages(false, msgUpserted, msgDeleted, msgBundle, MaxSyncMessageBytes)); err != nil {
			return err
		}
	}
}

// Stop ends every open Sync stream with Unavailable (agents reconnect,
// to this server when it is back or to another) and refuses new ones, so
// that the gRPC server's GracefulStop does not wait on streams that never
// end by themselves.
func (s *Service) Stop() { s.stopOnce.Do(func() { close(s.stopping) }) }

// recheckNode re-reads the caller's node record: a ban, an eviction or a
// re-attestation (new SVID serial) since the stream opened ends it.
func (s *Service) recheckNode(ctx context.Context, c *caller) (*store.Node, error) {
	node, err := s.cfg.Store.GetNode(ctx, c.id.String())
	switch {
	case errors.Is(err, store.ErrNotFound):
		return nil, status.Errorf(codes.PermissionDenied, "agent %s was evicted: it must re-attest", c.id)
	case err != nil && ctx.Err() != nil:
		return nil, status.FromContextError(ctx.Err()).Err()
	case err != nil:
		// The agent reconnects and is re-checked; a stream must not go on
		// without knowing whether its node is still admitted.
		return nil, status.Errorf(codes.Unavailable, "re-reading agent %s: %v", c.id, err)
	case node.Banned:
		return nil, status.Errorf(codes.PermissionDenied, "agent %s was banned", c.id)
	case node.CertSerial != c.cert.SerialNumber.String():
		return nil, status.Errorf(codes.PermissionDenied, "agent %s re-attested: the SVID this stream was opened with is no longer current", c.id)
	}
	return node, nil
}

// agentSet is the set of entries a Sync stream has sent, kept in step with
// the entry cache. After a change it is updated incrementally: each changed
// entry's membership is checked by walking up its parents (O(depth)), so a
// commit costs each stream O(changed entries), not O(its set). It falls
// back to recomputing the whole set (Authorized, then Diff) when the cache
// cannot list the changes (it reloaded, or the stream fell too far behind),
// when the node's selectors changed, or when an entry that parents others
// joined, left or was renamed: its children's membership changes without
// the children being in the change list.
type agentSet struct {
	cache *entrycache.Cache
	agent spiffeid.ID
	sels  []store.Selector
	byID  map[string]*store.Entry
	// rev is the cache revision whose changes the set reflects.
	rev uint64
	// recomputes counts full recomputations (tests check both paths run).
	recomputes int
}

func newAgentSet(cache *entrycache.Cache, agent spiffeid.ID, sels []store.Selector) *agentSet {
	a := &agentSet{cache: cache, agent: agent, sels: sels}
	a.recompute(cache.Revision())
	return a
}

// entries returns the set sorted by ID.
func (a *agentSet) entries() []*store.Entry {
	out := make([]*store.Entry, 0, len(a.byID))
	for _, e := range a.byID {
		out = append(out, e)
	}
	return sortedByID(out)
}

// recompute replaces the set with a full computation and returns the
// difference, each part sorted by ID. The cache state it reads is at least
// rev; changes after rev are looked at again on the next advance, which is
// harmless.
func (a *agentSet) recompute(rev uint64) (upserted, removed []*store.Entry) {
	next := a.cache.Authorized(a.agent, a.sels)
	prev := make([]*store.Entry, 0, len(a.byID))
	for _, e := range a.byID {
		prev = append(prev, e)
	}
	added, updated, removed := entrycache.Diff(prev, next)
	a.byID = make(map[string]*store.Entry, len(next))
	for _, e := range next {
		a.byID[e.ID] = e
	}
	a.rev = rev
	a.recomputes++
	return sortedByID(append(added, updated...)), removed
}

// advance brings the set up to the cache's current revision and returns
// the entries to upsert and to delete, each sorted by ID.
func (a *agentSet) advance(sels []store.Selector, selectorsChanged bool) (upserted, removed []*store.Entry) {
	ids, upTo, ok := a.cache.ChangedSince(a.rev)
	if selectorsChanged {
		a.sels = sels
		return a.recompute(upTo)
	}
	if !ok {
		return a.recompute(upTo)
	}
	if upTo == a.rev {
		return nil, nil
	}
	// A bulk change (a -data import) is cheaper to recompute than to walk
	// entry by entry.
	if len(ids) > max(64, len(a.byID)) {
		return a.recompute(upTo)
	}
	type change struct {
		old, cur   *store.Entry
		wasIn, now bool
	}
	var changes []change
	for _, id := range ids {
		old, wasIn := a.byID[id]
		cur, now := a.cache.AuthorizedEntry(a.agent, a.sels, id)
		if !wasIn && !now {
			continue
		}
		joinsOrLeaves := wasIn != now || (wasIn && now && old.SPIFFEID != cur.SPIFFEID)
		if joinsOrLeaves && (wasIn && a.cache.HasChildren(old.SPIFFEID) || now && a.cache.HasChildren(cur.SPIFFEID)) {
			return a.recompute(upTo)
		}
		changes = append(changes, change{old: old, cur: cur, wasIn: wasIn, now: now})
	}
	for _, ch := range changes {
		switch {
		case ch.now && (!ch.wasIn || ch.old.RevisionNumber != ch.cur.RevisionNumber || !ch.old.UpdatedAt.Equal(ch.cur.UpdatedAt)):
			a.byID[ch.cur.ID] = ch.cur
			upserted = append(upserted, ch.cur)
		case !ch.now:
			delete(a.byID, ch.old.ID)
			removed = append(removed, ch.old)
		}
	}
	a.rev = upTo
	return sortedByID(upserted), sortedByID(removed)
}

func drain(ch <-chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

func sortedByID(es []*store.Entry) []*store.Entry {
	out := slices.Clone(es)
	slices.SortFunc(out, func(a, b *store.Entry) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

func sendAll(stream agentv1.Agent_SyncServer, msgs []*agentv1.SyncResponse) error {
	for _, m := range msgs {
		if err := stream.Send(m); err != nil {
			// The client went away or the server is stopping.
			return err
		}
	}
	return nil
}

// syncMessages splits one change set into messages of at most budget bytes
// (a single entry larger than the budget still gets a message of its own;
// the store's limits keep entries far smaller). The first message carries
// full and the bundle, and every part of a full set but the last says more;
// deleted IDs follow the upserted entries. A full set
// always yields at least one message, an empty change set none.
func syncMessages(full bool, upserted []*agentv1.Entry, deleted []string, bundle *agentv1.Bundle, budget int) []*agentv1.SyncResponse {
	if !full && len(upserted) == 0 && len(deleted) == 0 && bundle == nil {
		return nil
	}
	cur := &agentv1.SyncResponse{Full: full, Bundle: bundle}
	size := proto.Size(cur)
	out := []*agentv1.SyncResponse{cur}
	room := func(n int) {
		if size+n > budget && (len(cur.Upserted) > 0 || len(cur.DeletedIds) > 0) {
			cur = &agentv1.SyncResponse{}
			size = 0
			out = append(out, cur)
		}
		size += n
	}
	for _, e := range upserted {
		room(proto.Size(e) + perItemOverhead)
		cur.Upserted = append(cur.Upserted, e)
	}
	for _, id := range deleted {
		room(len(id) + perItemOverhead)
		cur.DeletedIds = append(cur.DeletedIds, id)
	}
	if full {
		// Tell the agent the set is not complete before the last part, so
		// it does not drop what the later parts carry.
		for _, m := range out[:len(out)-1] {
			m.More = true
		}
	}
	return out
}
