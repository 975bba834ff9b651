package agentapi

import (
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// ipLimiter is a per-source-IP token bucket, as SPIRE limits attestation to
// 1/s per IP. Idle buckets are dropped so the map stays bounded.
type ipLimiter struct {
	rate  rate.Limit
	clock func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
	swept   time.Time
}

type bucket struct {
	l    *rate.Limiter
	seen time.Time
}

func newIPLimiter(perSecond float64, clock func() time.Time) *ipLimiter {
	return &ipLimiter{rate: rate.Limit(perSecond), clock: clock, buckets: map[string]*bucket{}}
}

// allow reports whether one more request from addr may proceed now.
func (l *ipLimiter) allow(addr net.Addr) bool {
	host := "unknown"
	if addr != nil {
		host = addr.String()
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.swept) > time.Minute {
		for k, b := range l.buckets {
			if now.Sub(b.seen) > time.Minute {
				delete(l.buckets, k)
			}
		}
		l.swept = now
	}
	b, ok := l.buckets[host]
	if !ok {
		// Burst 2: an agent whose first attempt failed on a transient error
		// may retry at once.
		b = &bucket{l: rate.NewLimiter(l.rate, 2)}
		l.buckets[host] = b
	}
	b.seen = now
	return b.l.AllowN(now, 1)
}
