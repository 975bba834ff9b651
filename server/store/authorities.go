package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

const authorityColumns = `kind, id, state, key_token, key_id, key_label, certificate, public_key, kid, not_before, not_after, created_at, updated_at`

func scanAuthority(r rowScanner) (*Authority, error) {
	var (
		a                                     Authority
		kind, state                           string
		notBefore, notAfter, created, updated int64
	)
	if err := r.Scan(&kind, &a.ID, &state, &a.KeyToken, &a.KeyID, &a.KeyLabel, &a.Certificate, &a.PublicKey, &a.KeyIDJWT,
		&notBefore, &notAfter, &created, &updated); err != nil {
		return nil, err
	}
	a.Kind, a.State = AuthorityKind(kind), AuthorityState(state)
	a.NotBefore, a.NotAfter = fromNanos(notBefore), fromNanos(notAfter)
	a.CreatedAt, a.UpdatedAt = fromNanos(created), fromNanos(updated)
	return &a, nil
}

// PutAuthority implements Store.
func (s *SQLStore) PutAuthority(ctx context.Context, as ...*Authority) error {
	for _, a := range as {
		if err := validateAuthority(a); err != nil {
			return fmt.Errorf("storing CA journal: %w", err)
		}
	}
	err := s.write(ctx, func(t *tx) error {
		kinds := map[AuthorityKind]bool{}
		for _, a := range as {
			kinds[a.Kind] = true
			if _, err := t.exec(ctx, `INSERT INTO authorities (`+authorityColumns+`)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
				ON CONFLICT (kind, id) DO UPDATE SET state = excluded.state, key_token = excluded.key_token,
					key_id = excluded.key_id, key_label = excluded.key_label, certificate = excluded.certificate,
					public_key = excluded.public_key, kid = excluded.kid, not_before = excluded.not_before,
					not_after = excluded.not_after, updated_at = excluded.updated_at`,
				string(a.Kind), a.ID, string(a.State), a.KeyToken, a.KeyID, a.KeyLabel, a.Certificate, a.PublicKey,
				a.KeyIDJWT, toNanos(a.NotBefore), toNanos(a.NotAfter), t.now.UnixNano(), t.now.UnixNano()); err != nil {
				return fmt.Errorf("writing authority %s/%s: %w", a.Kind, a.ID, err)
			}
			if err := t.event(ctx, EventBundle, string(a.Kind)+"/"+a.ID, OpUpdate); err != nil {
				return err
			}
		}
		// Checked after all writes so one call can demote and promote.
		for kind := range kinds {
			var active int
			if err := t.queryRow(ctx, `SELECT COUNT(*) FROM authorities WHERE kind = ? AND state = 'active'`, string(kind)).Scan(&active); err != nil {
				return fmt.Errorf("counting active %s authorities: %w", kind, err)
			}
			if active > 1 {
				return fmt.Errorf("%w: %d active %s authorities; at most one may be active", ErrInvalid, active, kind)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storing CA journal: %w", err)
	}
	return nil
}

// GetAuthority implements Store.
func (s *SQLStore) GetAuthority(ctx context.Context, kind AuthorityKind, id string) (*Authority, error) {
	a, err := scanAuthority(s.queryRow(ctx, `SELECT `+authorityColumns+` FROM authorities WHERE kind = ? AND id = ?`, string(kind), id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("getting authority %s/%s: %w", kind, id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting authority %s/%s: %w", kind, id, err)
	}
	return a, nil
}

// ListAuthorities implements Store.
func (s *SQLStore) ListAuthorities(ctx context.Context, kind AuthorityKind) ([]*Authority, error) {
	q := `SELECT ` + authorityColumns + ` FROM authorities`
	var args []any
	if kind != "" {
		q += ` WHERE kind = ?`
		args = append(args, string(kind))
	}
	rows, err := s.query(ctx, q+` ORDER BY kind, not_before, id`, args...)
	if err != nil {
		return nil, fmt.Errorf("listing authorities: %w", err)
	}
	defer rows.Close()
	var out []*Authority
	for rows.Next() {
		a, err := scanAuthority(rows)
		if err != nil {
			return nil, fmt.Errorf("listing authorities: %w", err)
		}
		out = append(out, a)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing authorities: %w", err)
	}
	return out, nil
}

// DeleteAuthority implements Store.
func (s *SQLStore) DeleteAuthority(ctx context.Context, kind AuthorityKind, id string) error {
	err := s.write(ctx, func(t *tx) error {
		res, err := t.exec(ctx, `DELETE FROM authorities WHERE kind = ? AND id = ?`, string(kind), id)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return ErrNotFound
		}
		return t.event(ctx, EventBundle, string(kind)+"/"+id, OpDelete)
	})
	if err != nil {
		return fmt.Errorf("deleting authority %s/%s: %w", kind, id, err)
	}
	return nil
}

// BumpBundleSequence implements Store.
func (s *SQLStore) BumpBundleSequence(ctx context.Context) (int64, error) {
	var seq int64
	err := s.write(ctx, func(t *tx) error {
		if _, err := t.exec(ctx, `UPDATE counters SET value = value + 1 WHERE name = ?`, counterBundleSeq); err != nil {
			return err
		}
		if err := t.queryRow(ctx, `SELECT value FROM counters WHERE name = ?`, counterBundleSeq).Scan(&seq); err != nil {
			return err
		}
		return t.event(ctx, EventBundle, "sequence", OpUpdate)
	})
	if err != nil {
		return 0, fmt.Errorf("bumping bundle sequence: %w", err)
	}
	return seq, nil
}

// BundleSequence implements Store.
func (s *SQLStore) BundleSequence(ctx context.Context) (int64, error) {
	var seq int64
	if err := s.queryRow(ctx, `SELECT value FROM counters WHERE name = ?`, counterBundleSeq).Scan(&seq); err != nil {
		return 0, fmt.Errorf("reading bundle sequence: %w", err)
	}
	return seq, nil
}
