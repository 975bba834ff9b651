package workloadapi

import "sync"

// Feed is a ready-made Subscription for Source implementations. Push never
// blocks: a snapshot the reader has not taken yet is replaced by the newer
// one (latest wins), so a slow workload cannot hold up the agent's cache,
// and every snapshot is full state anyway.
type Feed struct {
	ch      chan *Snapshot
	mu      sync.Mutex
	closed  bool
	onClose func()
}

// NewFeed returns a Feed that delivers initial at once (if not nil) and
// calls onClose (if not nil) once, on the first Close; a Source uses it to
// forget the subscriber.
func NewFeed(initial *Snapshot, onClose func()) *Feed {
	f := &Feed{ch: make(chan *Snapshot, 1), onClose: onClose}
	if initial != nil {
		f.ch <- initial
	}
	return f
}

// Push delivers s, replacing any snapshot not yet read. After Close it does
// nothing.
func (f *Feed) Push(s *Snapshot) {
	if s == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	select {
	case <-f.ch:
	default:
	}
	f.ch <- s // cannot block: the only sender holds mu and just drained
}

// Updates implements Subscription.
func (f *Feed) Updates() <-chan *Snapshot { return f.ch }

// Close implements Subscription.
func (f *Feed) Close() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	onClose := f.onClose
	f.mu.Unlock()
	if onClose != nil {
		onClose()
	}
}

var _ Subscription = (*Feed)(nil)
