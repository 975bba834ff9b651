package store

import (
	"context"
	"fmt"
	"time"
)

// Events implements Store.
func (s *SQLStore) Events(ctx context.Context, afterID int64, limit int) ([]Event, error) {
	switch {
	case limit <= 0:
		limit = defaultEventsLimit
	case limit > maxEventsLimit:
		limit = maxEventsLimit
	}
	rows, err := s.query(ctx, `SELECT id, kind, object_id, op, created_at FROM events WHERE id > ? ORDER BY id LIMIT ?`, afterID, limit)
	if err != nil {
		return nil, fmt.Errorf("listing events: %w", err)
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var (
			e        Event
			kind, op string
			created  int64
		)
		if err := rows.Scan(&e.ID, &kind, &e.ObjectID, &op, &created); err != nil {
			return nil, fmt.Errorf("listing events: %w", err)
		}
		e.Kind, e.Op, e.CreatedAt = EventKind(kind), EventOp(op), fromNanos(created)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing events: %w", err)
	}
	// The prune mark is read after the events: a prune that committed in
	// between is then always noticed (at worst we ask for a needless reload),
	// never missed.
	var pruned int64
	if err := s.queryRow(ctx, `SELECT value FROM counters WHERE name = ?`, counterPrunedThrough).Scan(&pruned); err != nil {
		return nil, fmt.Errorf("listing events: reading prune mark: %w", err)
	}
	if afterID < pruned {
		return nil, fmt.Errorf("listing events after %d: %w through %d", afterID, ErrEventsPruned, pruned)
	}
	return out, nil
}

// LatestEventID implements Store.
func (s *SQLStore) LatestEventID(ctx context.Context) (int64, error) {
	var id int64
	if err := s.queryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM events`).Scan(&id); err != nil {
		return 0, fmt.Errorf("reading latest event ID: %w", err)
	}
	var pruned int64
	if err := s.queryRow(ctx, `SELECT value FROM counters WHERE name = ?`, counterPrunedThrough).Scan(&pruned); err != nil {
		return 0, fmt.Errorf("reading prune mark: %w", err)
	}
	return max(id, pruned), nil
}

// PruneEvents implements Store. It records the highest pruned ID, so that a
// follower asking for older events learns it must reload (ErrEventsPruned).
func (s *SQLStore) PruneEvents(ctx context.Context, keepAfter time.Time, keepLast int) (int64, error) {
	if keepLast < 0 {
		return 0, fmt.Errorf("pruning events: %w: negative keepLast", ErrInvalid)
	}
	var deleted int64
	err := s.write(ctx, func(t *tx) error {
		var latest int64
		if err := t.queryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM events`).Scan(&latest); err != nil {
			return err
		}
		var through int64
		if err := t.queryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM events WHERE created_at < ? AND id <= ?`,
			toNanos(keepAfter), latest-int64(keepLast)).Scan(&through); err != nil {
			return err
		}
		if through == 0 {
			return nil
		}
		res, err := t.exec(ctx, `DELETE FROM events WHERE id <= ?`, through)
		if err != nil {
			return err
		}
		if deleted, err = res.RowsAffected(); err != nil {
			return err
		}
		_, err = t.exec(ctx, `UPDATE counters SET value = ? WHERE name = ? AND value < ?`, through, counterPrunedThrough, through)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("pruning events: %w", err)
	}
	return deleted, nil
}
