package store

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// Defaults for RunEventPruner: a day of history, and never fewer than
// 10,000 events, so a follower that was briefly away catches up from the
// feed instead of reloading every entry.
const (
	DefaultEventRetention = 24 * time.Hour
	DefaultEventKeepLast  = 10000
	DefaultPruneInterval  = 10 * time.Minute
)

// PrunerOption configures RunEventPruner.
type PrunerOption func(*prunerOptions)

type prunerOptions struct {
	interval  time.Duration
	retention time.Duration
	keepLast  int
	logger    *slog.Logger
	now       func() time.Time
}

// WithPruneInterval sets how often the feed is pruned.
func WithPruneInterval(d time.Duration) PrunerOption {
	return func(o *prunerOptions) {
		if d > 0 {
			o.interval = d
		}
	}
}

// WithEventRetention keeps events younger than d and at least keepLast
// events.
func WithEventRetention(d time.Duration, keepLast int) PrunerOption {
	return func(o *prunerOptions) {
		if d >= 0 {
			o.retention = d
		}
		if keepLast >= 0 {
			o.keepLast = keepLast
		}
	}
}

// WithPrunerLogger sets where prune results and failures are logged.
func WithPrunerLogger(l *slog.Logger) PrunerOption {
	return func(o *prunerOptions) {
		if l != nil {
			o.logger = l
		}
	}
}

// RunEventPruner prunes the change feed of s periodically until ctx ends,
// then returns ctx's error. A failed prune is logged and retried at the next
// tick.
func RunEventPruner(ctx context.Context, s Store, opts ...PrunerOption) error {
	if s == nil {
		return fmt.Errorf("running event pruner: %w: store is nil", ErrInvalid)
	}
	o := prunerOptions{interval: DefaultPruneInterval, retention: DefaultEventRetention, keepLast: DefaultEventKeepLast,
		logger: slog.New(slog.DiscardHandler), now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	tick := time.NewTicker(o.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		n, err := s.PruneEvents(ctx, o.now().Add(-o.retention), o.keepLast)
		switch {
		case err != nil && ctx.Err() == nil:
			o.logger.WarnContext(ctx, "pruning store events failed", "error", err)
		case n > 0:
			o.logger.DebugContext(ctx, "pruned store events", "deleted", n)
		}
	}
}
