package manager

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/workloadapi"
)

// FetchJWTSVIDs implements workloadapi.Source: a JWT-SVID for audience for
// every matching workload entry (or only those with SPIFFE ID id), in
// snapshot order. Tokens are cached per entry and audience set until half
// their lifetime is left. An entry the server will not sign for is skipped;
// if none can be signed the first error is returned.
func (m *Manager) FetchJWTSVIDs(ctx context.Context, selectors []workloadapi.Selector, audience []string, id spiffeid.ID) ([]workloadapi.JWTSVID, error) {
	type target struct {
		entryID  string
		revision int64
		spiffeID spiffeid.ID
		hint     string
	}
	sels := selectorSet(selectors)
	m.mu.Lock()
	client := m.client
	var targets []target
	if m.invalid == "" {
		for _, e := range m.sortedLocked() {
			if (id.IsZero() || e.spiffeID == id) && matches(e.selectors, sels) {
				targets = append(targets, target{e.id, e.revision, e.spiffeID, e.hint})
			}
		}
	}
	m.mu.Unlock()
	if len(targets) == 0 {
		return nil, workloadapi.ErrNoIdentity
	}
	if client == nil {
		return nil, errors.New("fetching JWT-SVID: agent is not connected to the server")
	}
	aud := audienceKey(audience)
	var (
		out      []workloadapi.JWTSVID
		firstErr error
	)
	for _, t := range targets {
		key := t.entryID + "\x00" + strconv.FormatInt(t.revision, 10) + "\x00" + aud
		now := m.cfg.Clock()
		if svid, ok := m.jwt.get(key, now); ok {
			svid.Hint = t.hint
			out = append(out, svid)
			continue
		}
		svid, err := m.fetchShared(ctx, client, key, t.entryID, t.spiffeID, audience)
		if err != nil {
			m.log.Warn("fetching JWT-SVID failed", "entry", t.entryID, "spiffe_id", t.spiffeID.String(), "error", err)
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		svid.Hint = t.hint
		out = append(out, svid)
	}
	if len(out) == 0 {
		return nil, firstErr
	}
	return out, nil
}

// fetchShared mints a JWT-SVID and caches it. Concurrent misses for the same
// key (replicas of a workload starting together) share one server call; if
// that call fails, each caller tries on its own.
func (m *Manager) fetchShared(ctx context.Context, client agentv1.AgentClient, key, entryID string, id spiffeid.ID, audience []string) (workloadapi.JWTSVID, error) {
	call, leader := m.jwt.join(key)
	if !leader {
		select {
		case <-call.done:
			if call.err == nil {
				return call.svid, nil
			}
		case <-ctx.Done():
			return workloadapi.JWTSVID{}, fmt.Errorf("fetching JWT-SVID for entry %s: %w", entryID, ctx.Err())
		}
		svid, refreshAt, err := m.newJWTSVID(ctx, client, entryID, id, audience)
		if err == nil {
			m.jwt.put(key, entryID, svid, refreshAt)
		}
		return svid, err
	}
	svid, refreshAt, err := m.newJWTSVID(ctx, client, entryID, id, audience)
	if err == nil {
		m.jwt.put(key, entryID, svid, refreshAt)
	}
	m.jwt.finish(key, call, svid, err)
	return svid, err
}

func (m *Manager) newJWTSVID(ctx context.Context, client agentv1.AgentClient, entryID string, want spiffeid.ID, audience []string) (workloadapi.JWTSVID, time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.RPCTimeout)
	defer cancel()
	resp, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: entryID, Audience: audience})
	if err != nil {
		return workloadapi.JWTSVID{}, time.Time{}, fmt.Errorf("fetching JWT-SVID for entry %s: %w", entryID, err)
	}
	s := resp.GetSvid()
	if s == nil || s.Token == "" {
		return workloadapi.JWTSVID{}, time.Time{}, fmt.Errorf("fetching JWT-SVID for entry %s: server returned no token", entryID)
	}
	if s.SpiffeId != want.String() {
		return workloadapi.JWTSVID{}, time.Time{}, fmt.Errorf("fetching JWT-SVID for entry %s: server signed %q, not %s", entryID, s.SpiffeId, want)
	}
	exp := time.Unix(s.ExpiresAt, 0)
	iat := time.Unix(s.IssuedAt, 0)
	if s.IssuedAt == 0 || !exp.After(iat) {
		iat = m.cfg.Clock()
	}
	refreshAt := iat.Add(exp.Sub(iat) / 2)
	return workloadapi.JWTSVID{ID: want, Token: s.Token, ExpiresAt: exp}, refreshAt, nil
}

// audienceKey is the cache key of an audience set: order and duplicates do
// not matter.
func audienceKey(aud []string) string {
	a := slices.Clone(aud)
	slices.Sort(a)
	a = slices.Compact(a)
	return strings.Join(a, "\x00")
}

// jwtCache is a bounded LRU of JWT-SVIDs, with the server calls in flight.
type jwtCache struct {
	mu       sync.Mutex
	max      int
	order    *list.List // front is most recently used
	items    map[string]*list.Element
	inflight map[string]*jwtCall
}

// jwtCall is one server call that callers missing the same key wait for.
type jwtCall struct {
	done    chan struct{}
	svid    workloadapi.JWTSVID
	err     error
	waiters int // callers that joined (under jwtCache.mu)
}

// join returns the call in flight for key, or starts one (leader true).
func (c *jwtCache) join(key string) (call *jwtCall, leader bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if call, ok := c.inflight[key]; ok {
		call.waiters++
		return call, false
	}
	call = &jwtCall{done: make(chan struct{})}
	c.inflight[key] = call
	return call, true
}

// finish publishes the leader's result to the waiting callers.
func (c *jwtCache) finish(key string, call *jwtCall, svid workloadapi.JWTSVID, err error) {
	c.mu.Lock()
	delete(c.inflight, key)
	c.mu.Unlock()
	call.svid, call.err = svid, err
	close(call.done)
}

type jwtItem struct {
	key       string
	entryID   string
	svid      workloadapi.JWTSVID
	refreshAt time.Time
}

func newJWTCache(n int) *jwtCache {
	return &jwtCache{max: n, order: list.New(), items: make(map[string]*list.Element), inflight: make(map[string]*jwtCall)}
}

func (c *jwtCache) get(key string, now time.Time) (workloadapi.JWTSVID, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[key]
	if !ok {
		return workloadapi.JWTSVID{}, false
	}
	it := el.Value.(*jwtItem)
	if !now.Before(it.refreshAt) {
		c.order.Remove(el)
		delete(c.items, key)
		return workloadapi.JWTSVID{}, false
	}
	c.order.MoveToFront(el)
	return it.svid, true
}

func (c *jwtCache) put(key, entryID string, svid workloadapi.JWTSVID, refreshAt time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[key]; ok {
		el.Value = &jwtItem{key, entryID, svid, refreshAt}
		c.order.MoveToFront(el)
		return
	}
	c.items[key] = c.order.PushFront(&jwtItem{key, entryID, svid, refreshAt})
	for c.order.Len() > c.max {
		last := c.order.Back()
		c.order.Remove(last)
		delete(c.items, last.Value.(*jwtItem).key)
	}
}

// dropEntries forgets the tokens of deleted or changed entries.
func (c *jwtCache) dropEntries(ids []string) {
	if len(ids) == 0 {
		return
	}
	drop := make(map[string]bool, len(ids))
	for _, id := range ids {
		drop[id] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for el := c.order.Front(); el != nil; {
		next := el.Next()
		if it := el.Value.(*jwtItem); drop[it.entryID] {
			c.order.Remove(el)
			delete(c.items, it.key)
		}
		el = next
	}
}

func (c *jwtCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.order.Init()
	clear(c.items)
}

func (c *jwtCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}
