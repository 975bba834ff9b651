package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

const entryColumns = `t.id, t.spiffe_id, t.parent_id, t.selectors, t.x509_svid_ttl, t.jwt_svid_ttl, t.dns_names, t.hint, t.revision, t.created_at, t.updated_at`

func scanEntry(r rowScanner) (*Entry, error) {
	var (
		e                Entry
		sels, dns        string
		created, updated int64
	)
	if err := r.Scan(&e.ID, &e.SPIFFEID, &e.ParentID, &sels, &e.X509SVIDTTL, &e.JWTSVIDTTL, &dns, &e.Hint,
		&e.RevisionNumber, &created, &updated); err != nil {
		return nil, err
	}
	var err error
	if e.Selectors, err = decodeSelectors(sels); err != nil {
		return nil, err
	}
	if e.DNSNames, err = decodeStrings(dns); err != nil {
		return nil, err
	}
	e.CreatedAt, e.UpdatedAt = fromNanos(created), fromNanos(updated)
	return &e, nil
}

// prepareEntry validates in and returns the normalised copy to store.
func prepareEntry(in *Entry) (*Entry, error) {
	if err := in.Validate(); err != nil {
		return nil, err
	}
	e := in.Clone()
	e.Selectors = NormalizeSelectors(e.Selectors)
	if len(e.DNSNames) == 0 {
		e.DNSNames = nil
	}
	return e, nil
}

// checkUnique reports ErrAlreadyExists when another entry has the same
// SPIFFE ID, parent ID and selector set. The UNIQUE constraint enforces the
// same; checking first gives a portable, clear error.
func (t *tx) checkUnique(ctx context.Context, e *Entry, hash string) error {
	var other string
	err := t.queryRow(ctx, `SELECT id FROM entries WHERE spiffe_id = ? AND parent_id = ? AND selectors_hash = ? AND id <> ?`,
		e.SPIFFEID, e.ParentID, hash, e.ID).Scan(&other)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil
	case err != nil:
		return fmt.Errorf("checking for a similar entry: %w", err)
	}
	return fmt.Errorf("%w: entry %s has the same SPIFFE ID, parent ID and selectors", ErrAlreadyExists, other)
}

func (t *tx) writeEntrySelectors(ctx context.Context, e *Entry) error {
	if _, err := t.exec(ctx, `DELETE FROM entry_selectors WHERE entry_id = ?`, e.ID); err != nil {
		return fmt.Errorf("replacing entry selectors: %w", err)
	}
	for _, sel := range e.Selectors {
		if _, err := t.exec(ctx, `INSERT INTO entry_selectors (entry_id, selector) VALUES (?, ?)`, e.ID, sel.String()); err != nil {
			return fmt.Errorf("writing entry selector: %w", err)
		}
	}
	return nil
}

func (t *tx) createEntry(ctx context.Context, in *Entry) (*Entry, error) {
	e, err := prepareEntry(in)
	if err != nil {
		return nil, err
	}
	if e.ID == "" {
		e.ID = newEntryID()
	} else if err := validateEntryID(e.ID); err != nil {
		return nil, err
	}
	var exists int
	err = t.queryRow(ctx, `SELECT 1 FROM entries WHERE id = ?`, e.ID).Scan(&exists)
	switch {
	case err == nil:
		return nil, fmt.Errorf("%w: entry ID %s is taken", ErrAlreadyExists, e.ID)
	case !errors.Is(err, sql.ErrNoRows):
		return nil, fmt.Errorf("checking entry ID: %w", err)
	}
	canonical := encodeSelectors(e.Selectors)
	hash := selectorsHash(canonical)
	if err := t.checkUnique(ctx, e, hash); err != nil {
		return nil, err
	}
	e.RevisionNumber = 0
	e.CreatedAt, e.UpdatedAt = t.now, t.now
	if _, err := t.exec(ctx, `INSERT INTO entries (id, spiffe_id, parent_id, selectors, selectors_hash, x509_svid_ttl, jwt_svid_ttl,
			dns_names, hint, revision, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)`,
		e.ID, e.SPIFFEID, e.ParentID, canonical, hash, e.X509SVIDTTL, e.JWTSVIDTTL, encodeStrings(e.DNSNames), e.Hint,
		toNanos(e.CreatedAt), toNanos(e.UpdatedAt)); err != nil {
		return nil, fmt.Errorf("writing entry: %w", err)
	}
	if err := t.writeEntrySelectors(ctx, e); err != nil {
		return nil, err
	}
	if err := t.event(ctx, EventEntry, e.ID, OpCreate); err != nil {
		return nil, err
	}
	return e, nil
}

// CreateEntry implements Store.
func (s *SQLStore) CreateEntry(ctx context.Context, in *Entry) (*Entry, error) {
	var out *Entry
	err := s.write(ctx, func(t *tx) error {
		var err error
		out, err = t.createEntry(ctx, in)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("creating entry: %w", err)
	}
	return out, nil
}

// CreateEntries implements Store.
func (s *SQLStore) CreateEntries(ctx context.Context, in []*Entry) ([]*Entry, error) {
	if len(in) > maxBatchEntries {
		return nil, fmt.Errorf("creating entries: %w: batch of %d is over the limit of %d", ErrInvalid, len(in), maxBatchEntries)
	}
	out := make([]*Entry, 0, len(in))
	err := s.write(ctx, func(t *tx) error {
		for i, e := range in {
			created, err := t.createEntry(ctx, e)
			if err != nil {
				return &BatchError{Index: i, Err: err}
			}
			out = append(out, created)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("creating entries: %w", err)
	}
	return out, nil
}

// UpdateEntry implements Store.
func (s *SQLStore) UpdateEntry(ctx context.Context, in *Entry) (*Entry, error) {
	if in == nil || in.ID == "" {
		return nil, fmt.Errorf("updating entry: %w: entry ID is empty", ErrInvalid)
	}
	e, err := prepareEntry(in)
	if err != nil {
		return nil, fmt.Errorf("updating entry %s: %w", in.ID, err)
	}
	err = s.write(ctx, func(t *tx) error {
		old, err := scanEntry(t.queryRow(ctx, `SELECT `+entryColumns+` FROM entries t WHERE t.id = ?`, e.ID))
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		} else if err != nil {
			return fmt.Errorf("reading entry: %w", err)
		}
		canonical := encodeSelectors(e.Selectors)
		hash := selectorsHash(canonical)
		if err := t.checkUnique(ctx, e, hash); err != nil {
			return err
		}
		e.RevisionNumber = old.RevisionNumber + 1
		e.CreatedAt, e.UpdatedAt = old.CreatedAt, t.now
		if _, err := t.exec(ctx, `UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, selectors_hash = ?,
				x509_svid_ttl = ?, jwt_svid_ttl = ?, dns_names = ?, hint = ?, revision = ?, updated_at = ? WHERE id = ?`,
			e.SPIFFEID, e.ParentID, canonical, hash, e.X509SVIDTTL, e.JWTSVIDTTL, encodeStrings(e.DNSNames), e.Hint,
			e.RevisionNumber, toNanos(e.UpdatedAt), e.ID); err != nil {
			return fmt.Errorf("writing entry: %w", err)
		}
		if err := t.writeEntrySelectors(ctx, e); err != nil {
			return err
		}
		return t.event(ctx, EventEntry, e.ID, OpUpdate)
	})
	if err != nil {
		return nil, fmt.Errorf("updating entry %s: %w", e.ID, err)
	}
	return e, nil
}

// DeleteEntry implements Store.
func (s *SQLStore) DeleteEntry(ctx context.Context, id string) (*Entry, error) {
	var e *Entry
	err := s.write(ctx, func(t *tx) error {
		var err error
		e, err = scanEntry(t.queryRow(ctx, `SELECT `+entryColumns+` FROM entries t WHERE t.id = ?`, id))
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		} else if err != nil {
			return fmt.Errorf("reading entry: %w", err)
		}
		if _, err := t.exec(ctx, `DELETE FROM entries WHERE id = ?`, id); err != nil {
			return err
		}
		return t.event(ctx, EventEntry, id, OpDelete)
	})
	if err != nil {
		return nil, fmt.Errorf("deleting entry %s: %w", id, err)
	}
	return e, nil
}

// GetEntry implements Store.
func (s *SQLStore) GetEntry(ctx context.Context, id string) (*Entry, error) {
	e, err := scanEntry(s.queryRow(ctx, `SELECT `+entryColumns+` FROM entries t WHERE t.id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("getting entry %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting entry %s: %w", id, err)
	}
	return e, nil
}

// GetEntries implements Store.
func (s *SQLStore) GetEntries(ctx context.Context, ids []string) ([]*Entry, error) {
	var out []*Entry
	for start := 0; start < len(ids); start += getEntriesChunkSize {
		chunk := ids[start:min(start+getEntriesChunkSize, len(ids))]
		args := make([]any, len(chunk))
		for i, id := range chunk {
			args[i] = id
		}
		es, err := s.scanEntries(ctx, `SELECT `+entryColumns+` FROM entries t WHERE t.id IN (`+placeholders(len(chunk))+`)`, args...)
		if err != nil {
			return nil, fmt.Errorf("getting entries: %w", err)
		}
		out = append(out, es...)
	}
	return out, nil
}

// ListEntries implements Store.
func (s *SQLStore) ListEntries(ctx context.Context, req ListEntriesRequest) ([]*Entry, string, error) {
	size, err := pageSize(req.PageSize)
	if err != nil {
		return nil, "", fmt.Errorf("listing entries: %w", err)
	}
	q := `SELECT ` + entryColumns + ` FROM entries t WHERE 1 = 1`
	var args []any
	if req.SPIFFEID != "" {
		q += ` AND t.spiffe_id = ?`
		args = append(args, req.SPIFFEID)
	}
	if req.ParentID != "" {
		q += ` AND t.parent_id = ?`
		args = append(args, req.ParentID)
	}
	frag, fargs, err := selectorFilterSQL(req.BySelectors, "entry_selectors", "entry_id", "selectors_hash")
	if err != nil {
		return nil, "", fmt.Errorf("listing entries: %w", err)
	}
	q += frag
	args = append(args, fargs...)
	if req.PageToken != "" {
		q += ` AND t.id > ?`
		args = append(args, req.PageToken)
	}
	q += ` ORDER BY t.id`
	if size > 0 {
		q += ` LIMIT ?`
		args = append(args, size+1)
	}
	out, err := s.scanEntries(ctx, q, args...)
	if err != nil {
		return nil, "", fmt.Errorf("listing entries: %w", err)
	}
	next := ""
	if size > 0 && len(out) > size {
		out = out[:size]
		next = out[size-1].ID
	}
	return out, next, nil
}

func (s *SQLStore) scanEntries(ctx context.Context, q string, args ...any) ([]*Entry, error) {
	rows, err := s.query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Entry
	for rows.Next() {
		e, err := scanEntry(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
