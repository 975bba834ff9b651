// Package entrycache keeps every registration entry in memory, indexed so
// that the set of entries an agent is authorized for is computed without a
// database query, and follows the store's change feed so the index is
// current within milliseconds of a commit.
//
// The authorization rule: an agent is authorized for the entries parented to
// its agent ID, for the node-alias entries (parented to the server ID) whose
// selectors are all among the node's selectors, and, transitively, for the
// entries parented to the SPIFFE ID of any entry it is authorized for.
package entrycache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/server/store"
)

// Option configures New.
type Option func(*options)

type options struct {
	logger      *slog.Logger
	retryDelay  time.Duration
	histBatches int
	histIDs     int
}

// WithHistory bounds the change history ChangedSince answers from: the
// last batches refreshes, holding at most ids entry IDs in all (defaults
// 1024 and 65,536). A Sync stream further behind recomputes its set.
func WithHistory(batches, ids int) Option {
	return func(o *options) {
		if batches > 0 {
			o.histBatches = batches
		}
		if ids > 0 {
			o.histIDs = ids
		}
	}
}

// WithLogger sets the logger for refresh failures.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithRetryDelay sets how long Run waits before retrying a failed refresh
// (default 1s). Refreshes are otherwise driven by store notifications only.
func WithRetryDelay(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.retryDelay = d
		}
	}
}

// eventBatch is how many events one Refresh step reads.
const eventBatch = 1000

// Default history bounds (WithHistory).
const (
	defaultHistoryBatches = 1024
	defaultHistoryIDs     = 64 << 10
)

// changeBatch is the entry IDs one revision changed.
type changeBatch struct {
	rev uint64
	ids []string
}

// Cache is the in-memory entry index. It is safe for concurrent use: any
// number of Authorized calls run in parallel with one refresh.
type Cache struct {
	st       store.Store
	serverID string
	opts     options

	storeNotify <-chan struct{}
	cancelStore func()

	// refreshMu serialises refreshes; mu guards the index below.
	refreshMu sync.Mutex
	mu        sync.RWMutex
	byID      map[string]*store.Entry
	byParent  map[string]map[string]*store.Entry
	// bySPIFFEID lets AuthorizedEntry walk from an entry up to its parents.
	bySPIFFEID map[string]map[string]*store.Entry
	// aliasBySel maps a selector to the node aliases that have it.
	aliasBySel map[store.Selector]map[string]*store.Entry
	lastEvent  int64
	revision   uint64
	// nodeRev is the revision at which each node last had an event since
	// the last reload (reloadRev), so a Sync stream re-reads its node record
	// only when it changed.
	nodeRev   map[string]uint64
	reloadRev uint64
	// history lists the entry IDs each revision changed, complete after
	// histFloor, so a Sync stream can update its set incrementally.
	history   []changeBatch
	histIDs   int
	histFloor uint64

	subs store.Notifier
}

// New loads every entry from st and subscribes to its changes. Call Run to
// keep the cache current and Close to release the subscription.
func New(ctx context.Context, st store.Store, serverID spiffeid.ID, opts ...Option) (*Cache, error) {
	if st == nil || serverID.IsZero() {
		return nil, errors.New("creating entry cache: store and server ID are required")
	}
	o := options{logger: slog.New(slog.DiscardHandler), retryDelay: time.Second, histBatches: defaultHistoryBatches, histIDs: defaultHistoryIDs}
	for _, opt := range opts {
		opt(&o)
	}
	c := &Cache{st: st, serverID: serverID.String(), opts: o}
	// Subscribe before loading, so no commit between load and Run is missed.
	c.storeNotify, c.cancelStore = st.Subscribe()
	if err := c.reload(ctx); err != nil {
		c.cancelStore()
		return nil, fmt.Errorf("creating entry cache: %w", err)
	}
	return c, nil
}

// Close stops following the store.
func (c *Cache) Close() { c.cancelStore() }

// reload rebuilds the index from a full listing. The event ID is read
// before listing: events after it are replayed by the next Refresh, and
// replay is idempotent because it re-reads the current rows.
func (c *Cache) reload(ctx context.Context) error {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	last, err := c.st.LatestEventID(ctx)
	if err != nil {
		return fmt.Errorf("loading entries: %w", err)
	}
	entries, _, err := c.st.ListEntries(ctx, store.ListEntriesRequest{})
	if err != nil {
		return fmt.Errorf("loading entries: %w", err)
	}
	c.mu.Lock()
	c.byID = make(map[string]*store.Entry, len(entries))
	c.byParent = make(map[string]map[string]*store.Entry)
	c.bySPIFFEID = make(map[string]map[string]*store.Entry)
	c.aliasBySel = make(map[store.Selector]map[string]*store.Entry)
	for _, e := range entries {
		c.put(e)
	}
	c.lastEvent = last
	c.revision++
	// A reload cannot tell which nodes changed: treat all as changed.
	c.nodeRev = map[string]uint64{}
	c.reloadRev = c.revision
	c.history, c.histIDs, c.histFloor = nil, 0, c.revision
	c.mu.Unlock()
	c.subs.Notify()
	return nil
}

// Run applies store changes as they are committed until ctx ends. It never
// polls: it waits on the store's notification, and only after a failed
// refresh on a retry timer.
func (c *Cache) Run(ctx context.Context) error {
	var retry <-chan time.Time
	for {
		// Catch up first: a notification may have arrived before Run.
		if err := c.Refresh(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			c.opts.logger.WarnContext(ctx, "refreshing entry cache failed; will retry", "error", err, "retry_in", c.opts.retryDelay)
			retry = time.After(c.opts.retryDelay)
		} else {
			retry = nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.storeNotify:
		case <-retry:
		}
	}
}

// Refresh applies every event committed since the last refresh. Run calls
// it; tests and callers needing read-your-writes may call it directly.
func (c *Cache) Refresh(ctx context.Context) error {
	c.refreshMu.Lock()
	changed, err := c.refreshLocked(ctx)
	c.refreshMu.Unlock()
	if errors.Is(err, store.ErrEventsPruned) {
		// We fell behind the retained feed: start over from a full load.
		c.opts.logger.WarnContext(ctx, "entry cache fell behind the event feed; reloading")
		return c.reload(ctx)
	}
	if changed {
		c.subs.Notify()
	}
	return err
}

func (c *Cache) refreshLocked(ctx context.Context) (changed bool, err error) {
	for {
		c.mu.RLock()
		after := c.lastEvent
		c.mu.RUnlock()
		events, err := c.st.Events(ctx, after, eventBatch)
		if err != nil {
			return changed, fmt.Errorf("refreshing entry cache: %w", err)
		}
		if len(events) == 0 {
			return changed, nil
		}
		var ids, nodes []string
		seen := map[string]bool{}
		for _, ev := range events {
			switch {
			case ev.Kind == store.EventEntry && !seen[ev.ObjectID]:
				seen[ev.ObjectID] = true
				ids = append(ids, ev.ObjectID)
			case ev.Kind == store.EventNode:
				nodes = append(nodes, ev.ObjectID)
			}
		}
		current, err := c.st.GetEntries(ctx, ids)
		if err != nil {
			return changed, fmt.Errorf("refreshing entry cache: %w", err)
		}
		c.mu.Lock()
		for _, id := range ids {
			c.remove(id)
		}
		for _, e := range current {
			c.put(e)
		}
		c.lastEvent = events[len(events)-1].ID
		// Node and bundle events bump the revision too: a Sync stream must
		// re-check its node (ban, new selectors) and the bundle.
		c.revision++
		for _, n := range nodes {
			c.nodeRev[n] = c.revision
		}
		c.record(ids)
		c.mu.Unlock()
		changed = true
	}
}

// record appends the entry IDs the current revision changed to the
// history, trimming its oldest batches; the caller holds mu.
func (c *Cache) record(ids []string) {
	c.history = append(c.history, changeBatch{rev: c.revision, ids: ids})
	c.histIDs += len(ids)
	drop := 0
	for len(c.history)-drop > c.opts.histBatches || c.histIDs > c.opts.histIDs {
		c.histIDs -= len(c.history[drop].ids)
		c.histFloor = c.history[drop].rev
		drop++
	}
	if drop > 0 {
		c.history = append([]changeBatch(nil), c.history[drop:]...)
	}
}

// ChangedSince returns the IDs of the entries created, updated or deleted
// after revision rev, and the revision they bring the caller to. ok is
// false when the cache cannot tell (it reloaded, or rev is older than the
// history it keeps): the caller must recompute its set in full.
func (c *Cache) ChangedSince(rev uint64) (ids []string, upTo uint64, ok bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if rev < c.histFloor {
		return nil, c.revision, false
	}
	seen := map[string]struct{}{}
	for i := len(c.history) - 1; i >= 0 && c.history[i].rev > rev; i-- {
		for _, id := range c.history[i].ids {
			if _, dup := seen[id]; !dup {
				seen[id] = struct{}{}
				ids = append(ids, id)
			}
		}
	}
	return ids, c.revision, true
}

// HasChildren reports whether any entry is parented to the SPIFFE ID.
func (c *Cache) HasChildren(spiffeID string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.byParent[spiffeID]) > 0
}

// put adds e to the index; the caller holds mu and has removed any older
// version of e.
func (c *Cache) put(e *store.Entry) {
	c.byID[e.ID] = e
	if c.byParent[e.ParentID] == nil {
		c.byParent[e.ParentID] = map[string]*store.Entry{}
	}
	c.byParent[e.ParentID][e.ID] = e
	if c.bySPIFFEID[e.SPIFFEID] == nil {
		c.bySPIFFEID[e.SPIFFEID] = map[string]*store.Entry{}
	}
	c.bySPIFFEID[e.SPIFFEID][e.ID] = e
	if e.ParentID == c.serverID {
		for _, s := range e.Selectors {
			if c.aliasBySel[s] == nil {
				c.aliasBySel[s] = map[string]*store.Entry{}
			}
			c.aliasBySel[s][e.ID] = e
		}
	}
}

// remove drops the entry with id from the index; the caller holds mu.
func (c *Cache) remove(id string) {
	e, ok := c.byID[id]
	if !ok {
		return
	}
	delete(c.byID, id)
	if m := c.byParent[e.ParentID]; m != nil {
		delete(m, id)
		if len(m) == 0 {
			delete(c.byParent, e.ParentID)
		}
	}
	if m := c.bySPIFFEID[e.SPIFFEID]; m != nil {
		delete(m, id)
		if len(m) == 0 {
			delete(c.bySPIFFEID, e.SPIFFEID)
		}
	}
	if e.ParentID == c.serverID {
		for _, s := range e.Selectors {
			if m := c.aliasBySel[s]; m != nil {
				delete(m, id)
				if len(m) == 0 {
					delete(c.aliasBySel, s)
				}
			}
		}
	}
}

// Authorized returns the entries the agent is authorized for, given the
// node's selectors, in no particular order (sorting would double the cost;
// Diff does not need it). The entries are shared with the cache and must not
// be modified (Clone them first).
func (c *Cache) Authorized(agentID spiffeid.ID, nodeSelectors []store.Selector) []*store.Entry {
	agent := agentID.String()
	// The server ID's children are the node aliases themselves; an agent
	// claiming it gets nothing.
	if agentID.IsZero() || agent == c.serverID {
		return nil
	}
	c.mu.RLock()
	defer c.mu.RUnlock()

	// Every entry has exactly one parent and each parent is expanded once,
	// so no entry can be appended twice: no result set is needed. Aliases
	// are children of the server ID, which is never expanded.
	var out []*store.Entry
	queue := []string{agent}

	// Node aliases whose selectors are a subset of the node's: count, per
	// alias, how many of its (deduplicated) selectors the node has.
	if len(c.aliasBySel) > 0 && len(nodeSelectors) > 0 {
		hits := map[string]int{}
		nodeSet := make(map[store.Selector]struct{}, len(nodeSelectors))
		for _, s := range nodeSelectors {
			if _, dup := nodeSet[s]; dup {
				continue
			}
			nodeSet[s] = struct{}{}
			for id, alias := range c.aliasBySel[s] {
				hits[id]++
				if hits[id] == len(alias.Selectors) {
					out = append(out, alias)
					if len(c.byParent[alias.SPIFFEID]) > 0 {
						queue = append(queue, alias.SPIFFEID)
					}
				}
			}
		}
	}

	// Breadth-first over "parented to an authorized SPIFFE ID"; visited
	// guards against cycles (A parents B parents A).
	visited := map[string]struct{}{c.serverID: {}}
	for len(queue) > 0 {
		id := queue[0]
		queue = queue[1:]
		if _, ok := visited[id]; ok {
			continue
		}
		visited[id] = struct{}{}
		for _, e := range c.byParent[id] {
			out = append(out, e)
			// Only IDs that parent something are worth queueing; most
			// workload entries are leaves.
			if _, ok := visited[e.SPIFFEID]; !ok && len(c.byParent[e.SPIFFEID]) > 0 {
				queue = append(queue, e.SPIFFEID)
			}
		}
	}

	return out
}

// AuthorizedEntry returns the entry with entryID if the agent is authorized
// for it, as BatchNewX509SVID and NewJWTSVID must check per CSR. It walks
// from the entry up its parents instead of computing the whole set, so it
// costs O(depth), and it agrees with Authorized.
func (c *Cache) AuthorizedEntry(agentID spiffeid.ID, nodeSelectors []store.Selector, entryID string) (*store.Entry, bool) {
	agent := agentID.String()
	if agentID.IsZero() || agent == c.serverID {
		return nil, false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.byID[entryID]
	if !ok {
		return nil, false
	}
	var nodeSet map[store.Selector]struct{}
	isAlias := func(e *store.Entry) bool {
		if nodeSet == nil {
			nodeSet = make(map[store.Selector]struct{}, len(nodeSelectors))
			for _, s := range nodeSelectors {
				nodeSet[s] = struct{}{}
			}
		}
		for _, s := range e.Selectors {
			if _, ok := nodeSet[s]; !ok {
				return false
			}
		}
		return true
	}
	// tried holds parent SPIFFE IDs already resolved (or being resolved,
	// which cuts cycles); a success returns at once, so any ID met again
	// can only fail.
	tried := map[string]struct{}{}
	var authorized func(e *store.Entry) bool
	authorized = func(e *store.Entry) bool {
		switch e.ParentID {
		case agent:
			return true
		case c.serverID:
			return isAlias(e)
		}
		if _, ok := tried[e.ParentID]; ok {
			return false
		}
		tried[e.ParentID] = struct{}{}
		for _, p := range c.bySPIFFEID[e.ParentID] {
			if authorized(p) {
				return true
			}
		}
		return false
	}
	if !authorized(e) {
		return nil, false
	}
	return e, true
}

// Entry returns the cached entry with the ID. It must not be modified.
func (c *Cache) Entry(id string) (*store.Entry, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.byID[id]
	return e, ok
}

// Len returns the number of cached entries.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.byID)
}

// Revision increases every time the cache applies a batch of changes
// (entry, node or bundle events) or reloads.
func (c *Cache) Revision() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.revision
}

// NodeRevision returns the revision at which the cache last applied a
// change of the node with the agent ID (attestation, ban, eviction), or
// the revision of the last full reload, whichever is later. A Sync stream
// that read its node record when the cache was at revision r need re-read
// it only once NodeRevision exceeds r. The map behind it holds one number
// per node that changed since start-up or the last reload.
func (c *Cache) NodeRevision(agentID string) uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return max(c.nodeRev[agentID], c.reloadRev)
}

// LastEventID returns the ID of the last store event applied.
func (c *Cache) LastEventID() int64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.lastEvent
}

// Subscribe returns a channel signalled (coalescing, never blocking) after
// the cache applied changes, and a cancel function. A Sync stream waits on
// it, recomputes Authorized and sends the Diff.
func (c *Cache) Subscribe() (<-chan struct{}, func()) { return c.subs.Subscribe() }

// Diff compares two authorized sets by entry ID: added are in next only,
// updated are in both with a different revision (or update time, which
// tells a deleted-and-recreated entry with a reused ID apart), removed are
// in prev only. Each result is sorted by ID.
func Diff(prev, next []*store.Entry) (added, updated, removed []*store.Entry) {
	old := make(map[string]*store.Entry, len(prev))
	for _, e := range prev {
		old[e.ID] = e
	}
	for _, e := range next {
		o, ok := old[e.ID]
		switch {
		case !ok:
			added = append(added, e)
		case o.RevisionNumber != e.RevisionNumber || !o.UpdatedAt.Equal(e.UpdatedAt):
			updated = append(updated, e)
		}
		delete(old, e.ID)
	}
	for _, e := range old {
		removed = append(removed, e)
	}
	byID := func(a, b *store.Entry) int { return cmp.Compare(a.ID, b.ID) }
	slices.SortFunc(added, byID)
	slices.SortFunc(updated, byID)
	slices.SortFunc(removed, byID)
	return added, updated, removed
}
