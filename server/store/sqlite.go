package store

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	// The pure-Go SQLite driver, registered as "sqlite".
	_ "modernc.org/sqlite"
)

// DefaultSQLiteFile is the store's file name inside the server's data
// directory; SPIRE's name, so operators recognise it.
const DefaultSQLiteFile = "datastore.sqlite3"

//go:embed migrations
var migrationFS embed.FS

// OpenSQLite opens (creating if needed) the SQLite database at path and
// brings its schema up to date. The database runs in WAL mode with foreign
// keys on and a busy timeout, so readers never block the writer. It refuses
// a database whose schema is newer than this binary (ErrSchemaTooNew).
func OpenSQLite(ctx context.Context, dbPath string, opts ...Option) (*SQLStore, error) {
	o := options{logger: slog.New(slog.DiscardHandler), now: time.Now, busyTimeout: 5 * time.Second, maxConns: max(4, 2*runtime.GOMAXPROCS(0))}
	for _, opt := range opts {
		opt(&o)
	}
	// The driver splits the DSN at the first '?', and ":memory:" would give
	// every pooled connection its own empty database.
	if dbPath == "" || dbPath == ":memory:" || strings.ContainsAny(dbPath, "?#") {
		return nil, fmt.Errorf("opening SQLite store: %w: path %q must be a file path without '?' or '#'", ErrInvalid, dbPath)
	}
	dsn := dbPath + "?_txlock=immediate" +
		"&_pragma=busy_timeout(" + strconv.FormatInt(o.busyTimeout.Milliseconds(), 10) + ")" +
		"&_pragma=journal_mode(WAL)" +
		"&_pragma=foreign_keys(1)" +
		"&_pragma=synchronous(FULL)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening SQLite store %s: %w", dbPath, err)
	}
	// database/sql keeps 2 idle connections by default: under concurrent
	// reads it would open (parsing the schema and pragmas) and close one
	// per query. Writes are serialised by wmu, so a bounded pool cannot
	// starve them.
	db.SetMaxOpenConns(o.maxConns)
	db.SetMaxIdleConns(o.maxConns)
	s := &SQLStore{
		db:      db,
		dialect: dialect{name: "sqlite", migrations: "migrations/sqlite"},
		log:     o.logger,
		now:     o.now,
	}
	if err := s.migrate(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("opening SQLite store %s: %w", dbPath, err)
	}
	return s, nil
}

type migration struct {
	version int
	name    string
	sql     string
}

func (s *SQLStore) loadMigrations() ([]migration, error) {
	files, err := fs.ReadDir(migrationFS, s.dialect.migrations)
	if err != nil {
		return nil, fmt.Errorf("reading embedded migrations: %w", err)
	}
	var ms []migration
	for _, f := range files {
		if f.IsDir() || !strings.HasSuffix(f.Name(), ".sql") {
			continue
		}
		num, _, _ := strings.Cut(f.Name(), "_")
		v, err := strconv.Atoi(num)
		if err != nil {
			return nil, fmt.Errorf("migration file %s: name must start with its version number", f.Name())
		}
		b, err := fs.ReadFile(migrationFS, path.Join(s.dialect.migrations, f.Name()))
		if err != nil {
			return nil, fmt.Errorf("reading migration %s: %w", f.Name(), err)
		}
		ms = append(ms, migration{version: v, name: f.Name(), sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, fmt.Errorf("migrations are not numbered 1..n: %s", m.name)
		}
	}
	return ms, nil
}

// SchemaVersion returns the schema version of the open database.
func (s *SQLStore) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	if err := s.queryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	return v, nil
}

// migrate applies pending migrations forward only, each in its own
// transaction together with its schema_version row, so a failed migration
// leaves the previous version intact.
func (s *SQLStore) migrate(ctx context.Context) error {
	ms, err := s.loadMigrations()
	if err != nil {
		return err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	for {
		done, err := s.migrateOne(ctx, ms)
		if err != nil || done {
			return err
		}
	}
}

// migrateOne applies the next pending migration; the version is read inside
// the (immediate) transaction, so concurrent openers cannot both apply it.
func (s *SQLStore) migrateOne(ctx context.Context, ms []migration) (done bool, err error) {
	sqlTx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("beginning migration: %w", err)
	}
	defer func() {
		if err != nil {
			_ = sqlTx.Rollback()
		}
	}()
	// Created inside the immediate transaction: a bare CREATE TABLE on a
	// fresh file can meet another opener's lock without the busy handler
	// (SQLITE_BUSY at once), BEGIN IMMEDIATE waits for it.
	if _, err := sqlTx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
		version    INTEGER PRIMARY KEY,
		applied_at BIGINT NOT NULL)`); err != nil {
		return false, fmt.Errorf("creating schema_version table: %w", err)
	}
	var current int
	if err := sqlTx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&current); err != nil {
		return false, fmt.Errorf("reading schema version: %w", err)
	}
	if current > len(ms) {
		return false, fmt.Errorf("%w: database has version %d, this binary knows up to %d", ErrSchemaTooNew, current, len(ms))
	}
	if current == len(ms) {
		return true, sqlTx.Commit()
	}
	m := ms[current]
	if _, err := sqlTx.ExecContext(ctx, m.sql); err != nil {
		return false, fmt.Errorf("applying migration %s: %w", m.name, err)
	}
	if _, err := sqlTx.ExecContext(ctx, s.dialect.rebind(`INSERT INTO schema_version (version, applied_at) VALUES (?, ?)`),
		m.version, s.now().UnixNano()); err != nil {
		return false, fmt.Errorf("recording migration %s: %w", m.name, err)
	}
	if err := sqlTx.Commit(); err != nil {
		return false, fmt.Errorf("committing migration %s: %w", m.name, err)
	}
	s.log.InfoContext(ctx, "applied store migration", "version", m.version, "name", m.name)
	return false, nil
}
