// Package store persists the Ironroot server's state: attested nodes,
// registration entries, the CA journal (key references, never keys) and a
// change feed that the Sync stream follows.
//
// Store is the interface the rest of the server programs against; OpenSQLite
// returns the embedded SQLite implementation. Every write appends its change
// event in the same transaction and then wakes in-process subscribers, so a
// waiter sees a committed change at once, without polling.
package store

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Errors returned by Store methods, wrapped with what was being done; test
// them with errors.Is.
var (
	// ErrNotFound reports that the named record does not exist.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists reports that an equal record exists (for entries:
	// same SPIFFE ID, parent ID and selector set).
	ErrAlreadyExists = errors.New("already exists")
	// ErrBanned reports that the node is banned and must be evicted before
	// it may attest again.
	ErrBanned = errors.New("node is banned")
	// ErrInvalid reports input that failed validation.
	ErrInvalid = errors.New("invalid argument")
	// ErrSchemaTooNew reports a database written by a newer binary.
	ErrSchemaTooNew = errors.New("database schema is newer than this binary")
	// ErrEventsPruned reports that events after the requested ID were
	// pruned; the caller must reload its state in full.
	ErrEventsPruned = errors.New("events were pruned")
)

// BatchError is returned by CreateEntries when one entry of the batch fails;
// nothing of the batch was stored.
type BatchError struct {
	// Index is the position of the failing entry in the batch.
	Index int
	// Err is why it failed (wraps ErrInvalid, ErrAlreadyExists, ...).
	Err error
}

// Error implements error.
func (e *BatchError) Error() string {
	return fmt.Sprintf("entry %d of batch: %v", e.Index, e.Err)
}

// Unwrap lets errors.Is see the cause.
func (e *BatchError) Unwrap() error { return e.Err }

// Store is the server's persistent state. All methods are safe for
// concurrent use. Returned records are copies owned by the caller.
type Store interface {
	// UpsertNode stores a node after (re-)attestation: it creates the
	// record, or replaces selectors, evidence, serial, not-after and clock
	// while keeping CreatedAt. It refuses a banned node with ErrBanned.
	// The Banned field of n is ignored; use BanNode.
	UpsertNode(ctx context.Context, n *Node) (*Node, error)
	// GetNode returns the node with the agent ID, or ErrNotFound.
	GetNode(ctx context.Context, spiffeID string) (*Node, error)
	// ListNodes lists nodes ordered by SPIFFE ID and returns the token of
	// the next page ("" when done).
	ListNodes(ctx context.Context, req ListNodesRequest) ([]*Node, string, error)
	// DeleteNode evicts a node: the record is deleted and the agent may
	// attest afresh.
	DeleteNode(ctx context.Context, spiffeID string) error
	// BanNode marks a node banned and clears its certificate serial, so its
	// SVID is refused and it cannot re-attest until evicted.
	BanNode(ctx context.Context, spiffeID string) (*Node, error)

	// CreateEntry stores a new entry, assigning its ID when empty.
	CreateEntry(ctx context.Context, e *Entry) (*Entry, error)
	// CreateEntries stores a batch all-or-nothing in one transaction; on
	// failure the error is a *BatchError naming the failing entry.
	CreateEntries(ctx context.Context, es []*Entry) ([]*Entry, error)
	// UpdateEntry replaces the mutable fields of the entry with e.ID and
	// increments its revision.
	UpdateEntry(ctx context.Context, e *Entry) (*Entry, error)
	// DeleteEntry deletes the entry with the ID and returns it.
	DeleteEntry(ctx context.Context, id string) (*Entry, error)
	// GetEntry returns the entry with the ID, or ErrNotFound.
	GetEntry(ctx context.Context, id string) (*Entry, error)
	// GetEntries returns the entries with the given IDs that exist, in no
	// particular order.
	GetEntries(ctx context.Context, ids []string) ([]*Entry, error)
	// ListEntries lists entries ordered by ID and returns the token of the
	// next page ("" when done).
	ListEntries(ctx context.Context, req ListEntriesRequest) ([]*Entry, string, error)

	// PutAuthority inserts or updates CA journal records in one
	// transaction. At most one authority per kind may be active after it.
	PutAuthority(ctx context.Context, as ...*Authority) error
	// GetAuthority returns one CA journal record, or ErrNotFound.
	GetAuthority(ctx context.Context, kind AuthorityKind, id string) (*Authority, error)
	// ListAuthorities lists the journal of one kind (all kinds when kind is
	// empty), ordered by NotBefore then ID.
	ListAuthorities(ctx context.Context, kind AuthorityKind) ([]*Authority, error)
	// DeleteAuthority removes a journal record.
	DeleteAuthority(ctx context.Context, kind AuthorityKind, id string) error
	// BumpBundleSequence increments and returns the bundle sequence number
	// (spiffe_sequence).
	BumpBundleSequence(ctx context.Context) (int64, error)
	// BundleSequence returns the current bundle sequence number.
	BundleSequence(ctx context.Context) (int64, error)

	// Events returns up to limit events with ID > afterID in ID order. It
	// returns ErrEventsPruned when some of those events were pruned.
	Events(ctx context.Context, afterID int64, limit int) ([]Event, error)
	// LatestEventID returns the ID of the newest event (0 when none).
	LatestEventID(ctx context.Context) (int64, error)
	// PruneEvents deletes events older than keepAfter while keeping at
	// least the newest keepLast events; it returns how many were deleted.
	PruneEvents(ctx context.Context, keepAfter time.Time, keepLast int) (int64, error)
	// Subscribe returns a channel that receives a (coalesced) signal after
	// every committed change, and a function that cancels the subscription.
	Subscribe() (notify <-chan struct{}, cancel func())

	// Close releases the database.
	Close() error
}
