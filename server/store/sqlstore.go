package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
)

// Listing limits: page sizes above maxPageSize are clamped, and selector
// filters are bounded so a query stays within every database's parameter
// limit.
const (
	maxPageSize          = 10000
	maxFilterSelectors   = 1000
	defaultEventsLimit   = 1000
	maxEventsLimit       = 10000
	maxBatchEntries      = 10000
	getEntriesChunkSize  = 500
	counterBundleSeq     = "bundle_sequence"
	counterPrunedThrough = "events_pruned_through"
)

// Option configures OpenSQLite.
type Option func(*options)

type options struct {
	logger      *slog.Logger
	now         func() time.Time
	busyTimeout time.Duration
	maxConns    int
}

// WithLogger sets the logger for migrations and maintenance messages.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithClock sets the time source for CreatedAt/UpdatedAt and event times.
func WithClock(now func() time.Time) Option {
	return func(o *options) {
		if now != nil {
			o.now = now
		}
	}
}

// WithBusyTimeout sets how long a write waits for another process holding
// the database lock (default 5s).
func WithBusyTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.busyTimeout = d
		}
	}
}

// WithMaxConns bounds the database connection pool (default: twice the
// number of CPUs, at least 4). Every connection stays open once made: many
// concurrent readers (a Sync stream per agent re-reading its node) would
// otherwise open and close a connection per query.
func WithMaxConns(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxConns = n
		}
	}
}

// SQLStore is the database/sql implementation of Store. Use OpenSQLite.
type SQLStore struct {
	db      *sql.DB
	dialect dialect
	log     *slog.Logger
	now     func() time.Time
	// wmu serialises this process's writers: SQLite has a single writer
	// anyway, and queuing here is cheaper than spinning on SQLITE_BUSY.
	wmu  sync.Mutex
	subs Notifier
}

var _ Store = (*SQLStore)(nil)

// dialect holds the few places where SQL differs between databases.
type dialect struct {
	name string
	// dollarPlaceholders rewrites "?" into "$1, $2, ..." (PostgreSQL).
	dollarPlaceholders bool
	// migrations is the directory of embedded migration files.
	migrations string
}

func (d dialect) rebind(q string) string {
	if !d.dollarPlaceholders {
		return q
	}
	var b strings.Builder
	n := 0
	for _, r := range q {
		if r == '?' {
			n++
			fmt.Fprintf(&b, "$%d", n)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Close releases the database.
func (s *SQLStore) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("closing store: %w", err)
	}
	return nil
}

// DB returns the underlying handle, for health checks and tests.
func (s *SQLStore) DB() *sql.DB { return s.db }

// Subscribe implements Store.
func (s *SQLStore) Subscribe() (<-chan struct{}, func()) { return s.subs.Subscribe() }

// tx is one write transaction; events are appended to it as changes are made.
type tx struct {
	s      *SQLStore
	sqlTx  *sql.Tx
	now    time.Time
	events int
}

func (t *tx) exec(ctx context.Context, q string, args ...any) (sql.Result, error) {
	return t.sqlTx.ExecContext(ctx, t.s.dialect.rebind(q), args...)
}

func (t *tx) queryRow(ctx context.Context, q string, args ...any) *sql.Row {
	return t.sqlTx.QueryRowContext(ctx, t.s.dialect.rebind(q), args...)
}

func (t *tx) event(ctx context.Context, kind EventKind, objectID string, op EventOp) error {
	if _, err := t.exec(ctx, `INSERT INTO events (kind, object_id, op, created_at) VALUES (?, ?, ?, ?)`,
		string(kind), objectID, string(op), t.now.UnixNano()); err != nil {
		return fmt.Errorf("appending %s %s event: %w", kind, op, err)
	}
	t.events++
	return nil
}

// write runs fn in one write transaction and wakes subscribers after a
// commit that appended events.
func (s *SQLStore) write(ctx context.Context, fn func(t *tx) error) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	sqlTx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("beginning transaction: %w", err)
	}
	// UTC without the monotonic reading, so returned records equal stored ones.
	t := &tx{s: s, sqlTx: sqlTx, now: s.now().UTC().Round(0)}
	if err := fn(t); err != nil {
		_ = sqlTx.Rollback()
		return err
	}
	if err := sqlTx.Commit(); err != nil {
		return fmt.Errorf("committing transaction: %w", err)
	}
	if t.events > 0 {
		s.subs.Notify()
	}
	return nil
}

func (s *SQLStore) queryRow(ctx context.Context, q string, args ...any) *sql.Row {
	return s.db.QueryRowContext(ctx, s.dialect.rebind(q), args...)
}

func (s *SQLStore) query(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return s.db.QueryContext(ctx, s.dialect.rebind(q), args...)
}

// ---- time and encoding helpers ----

func toNanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func encodeSelectors(sels []Selector) string {
	strs := make([]string, len(sels))
	for i, s := range sels {
		strs[i] = s.String()
	}
	b, _ := json.Marshal(strs) // a []string always marshals
	return string(b)
}

func decodeSelectors(s string) ([]Selector, error) {
	var strs []string
	if err := json.Unmarshal([]byte(s), &strs); err != nil {
		return nil, fmt.Errorf("decoding stored selectors: %w", err)
	}
	out := make([]Selector, len(strs))
	for i, str := range strs {
		typ, value, _ := strings.Cut(str, ":")
		out[i] = Selector{Type: typ, Value: value}
	}
	return out, nil
}

func selectorsHash(canonical string) string {
	sum := sha256.Sum256([]byte(canonical))
	return hex.EncodeToString(sum[:])
}

func encodeStrings(v []string) string {
	if v == nil {
		v = []string{}
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func decodeStrings(s string) ([]string, error) {
	var v []string
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, fmt.Errorf("decoding stored list: %w", err)
	}
	if len(v) == 0 {
		return nil, nil
	}
	return v, nil
}

func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

// selectorFilterSQL returns the WHERE fragment that applies f to the rows of
// table (alias "t") whose selectors live in selTable keyed by fkCol.
func selectorFilterSQL(f *SelectorFilter, selTable, fkCol, hashCol string) (string, []any, error) {
	if f == nil {
		return "", nil, nil
	}
	if err := validateSelectors(f.Selectors, false); err != nil {
		return "", nil, fmt.Errorf("selector filter: %w", err)
	}
	sels := NormalizeSelectors(f.Selectors)
	if len(sels) > maxFilterSelectors {
		return "", nil, fmt.Errorf("%w: selector filter has more than %d selectors", ErrInvalid, maxFilterSelectors)
	}
	args := make([]any, len(sels))
	for i, sel := range sels {
		args[i] = sel.String()
	}
	in := placeholders(len(sels))
	switch f.Match {
	case MatchExact:
		if hashCol != "" {
			return " AND t." + hashCol + " = ?", []any{selectorsHash(encodeSelectors(sels))}, nil
		}
		// Exact = superset with no extra selectors.
		return fmt.Sprintf(" AND (SELECT COUNT(*) FROM %[1]s s WHERE s.%[2]s = t.%[3]s AND s.selector IN (%[4]s)) = ?"+
				" AND (SELECT COUNT(*) FROM %[1]s s WHERE s.%[2]s = t.%[3]s) = ?", selTable, fkCol, pkOf(selTable), in),
			append(append(args, len(sels)), len(sels)), nil
	case MatchSubset:
		return fmt.Sprintf(" AND NOT EXISTS (SELECT 1 FROM %s s WHERE s.%s = t.%s AND s.selector NOT IN (%s))",
			selTable, fkCol, pkOf(selTable), in), args, nil
	case MatchSuperset:
		return fmt.Sprintf(" AND (SELECT COUNT(*) FROM %s s WHERE s.%s = t.%s AND s.selector IN (%s)) = ?",
			selTable, fkCol, pkOf(selTable), in), append(args, len(sels)), nil
	case MatchAny:
		return fmt.Sprintf(" AND EXISTS (SELECT 1 FROM %s s WHERE s.%s = t.%s AND s.selector IN (%s))",
			selTable, fkCol, pkOf(selTable), in), args, nil
	default:
		return "", nil, fmt.Errorf("%w: unknown selector match mode %d", ErrInvalid, f.Match)
	}
}

func pkOf(selTable string) string {
	if selTable == "node_selectors" {
		return "spiffe_id"
	}
	return "id"
}

func pageSize(n int) (int, error) {
	switch {
	case n < 0:
		return 0, fmt.Errorf("%w: negative page size", ErrInvalid)
	case n > maxPageSize:
		return maxPageSize, nil
	}
	return n, nil
}

func newEntryID() string { return uuid.NewString() }
