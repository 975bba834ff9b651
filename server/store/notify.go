package store

import "sync"

// Notifier fans a "something changed" signal out to subscribers. Each
// subscriber has a one-slot channel: a send never blocks and signals that
// arrive while one is pending coalesce into it. The zero value is ready to
// use. The store, the entry cache and the CA manager wake their waiters with
// it.
type Notifier struct {
	mu   sync.Mutex
	subs map[chan struct{}]struct{}
}

// Subscribe returns a channel signalled after each Notify (coalesced) and a
// function that cancels the subscription (idempotent).
func (n *Notifier) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	n.mu.Lock()
	if n.subs == nil {
		n.subs = make(map[chan struct{}]struct{})
	}
	n.subs[ch] = struct{}{}
	n.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			n.mu.Lock()
			delete(n.subs, ch)
			n.mu.Unlock()
		})
	}
}

// Notify signals every subscriber without blocking.
func (n *Notifier) Notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for ch := range n.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
