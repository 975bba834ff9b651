package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

const nodeColumns = `t.spiffe_id, t.ek_hash, t.selectors, t.evidence, t.cert_serial, t.cert_not_after, t.banned, t.clock, t.created_at, t.updated_at`

type rowScanner interface{ Scan(dest ...any) error }

func scanNode(r rowScanner) (*Node, error) {
	var (
		n                          Node
		sels                       string
		notAfter, created, updated int64
		banned                     int
	)
	if err := r.Scan(&n.SPIFFEID, &n.EKHash, &sels, &n.Evidence, &n.CertSerial, &notAfter, &banned, &n.Clock, &created, &updated); err != nil {
		return nil, err
	}
	var err error
	if n.Selectors, err = decodeSelectors(sels); err != nil {
		return nil, err
	}
	n.CertNotAfter, n.CreatedAt, n.UpdatedAt = fromNanos(notAfter), fromNanos(created), fromNanos(updated)
	n.Banned = banned != 0
	return &n, nil
}

// UpsertNode implements Store.
func (s *SQLStore) UpsertNode(ctx context.Context, in *Node) (*Node, error) {
	if err := validateNode(in); err != nil {
		return nil, fmt.Errorf("storing node: %w", err)
	}
	n := in.Clone()
	n.Selectors = NormalizeSelectors(n.Selectors)
	n.Banned = false
	err := s.write(ctx, func(t *tx) error {
		old, err := scanNode(t.queryRow(ctx, `SELECT `+nodeColumns+` FROM nodes t WHERE t.spiffe_id = ?`, n.SPIFFEID))
		op := OpUpdate
		switch {
		case errors.Is(err, sql.ErrNoRows):
			op = OpCreate
			n.CreatedAt = t.now
		case err != nil:
			return fmt.Errorf("reading node: %w", err)
		case old.Banned:
			return ErrBanned
		default:
			n.CreatedAt = old.CreatedAt
		}
		n.UpdatedAt = t.now
		if _, err := t.exec(ctx, `INSERT INTO nodes (spiffe_id, ek_hash, selectors, evidence, cert_serial, cert_not_after, banned, clock, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)
			ON CONFLICT (spiffe_id) DO UPDATE SET ek_hash = excluded.ek_hash, selectors = excluded.selectors,
				evidence = excluded.evidence, cert_serial = excluded.cert_serial, cert_not_after = excluded.cert_not_after,
				clock = excluded.clock, updated_at = excluded.updated_at`,
			n.SPIFFEID, n.EKHash, encodeSelectors(n.Selectors), n.Evidence, n.CertSerial, toNanos(n.CertNotAfter),
			n.Clock, toNanos(n.CreatedAt), toNanos(n.UpdatedAt)); err != nil {
			return fmt.Errorf("writing node: %w", err)
		}
		if _, err := t.exec(ctx, `DELETE FROM node_selectors WHERE node_id = ?`, n.SPIFFEID); err != nil {
			return fmt.Errorf("replacing node selectors: %w", err)
		}
		for _, sel := range n.Selectors {
			if _, err := t.exec(ctx, `INSERT INTO node_selectors (node_id, selector) VALUES (?, ?)`, n.SPIFFEID, sel.String()); err != nil {
				return fmt.Errorf("writing node selector: %w", err)
			}
		}
		return t.event(ctx, EventNode, n.SPIFFEID, op)
	})
	if err != nil {
		return nil, fmt.Errorf("storing node %s: %w", n.SPIFFEID, err)
	}
	return n, nil
}

// GetNode implements Store.
func (s *SQLStore) GetNode(ctx context.Context, spiffeID string) (*Node, error) {
	n, err := scanNode(s.queryRow(ctx, `SELECT `+nodeColumns+` FROM nodes t WHERE t.spiffe_id = ?`, spiffeID))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("getting node %s: %w", spiffeID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting node %s: %w", spiffeID, err)
	}
	return n, nil
}

// ListNodes implements Store.
func (s *SQLStore) ListNodes(ctx context.Context, req ListNodesRequest) ([]*Node, string, error) {
	size, err := pageSize(req.PageSize)
	if err != nil {
		return nil, "", fmt.Errorf("listing nodes: %w", err)
	}
	q := `SELECT ` + nodeColumns + ` FROM nodes t WHERE 1 = 1`
	var args []any
	if req.Banned != nil {
		q += ` AND t.banned = ?`
		args = append(args, boolInt(*req.Banned))
	}
	frag, fargs, err := selectorFilterSQL(req.BySelectors, "node_selectors", "node_id", "")
	if err != nil {
		return nil, "", fmt.Errorf("listing nodes: %w", err)
	}
	q += frag
	args = append(args, fargs...)
	if req.PageToken != "" {
		q += ` AND t.spiffe_id > ?`
		args = append(args, req.PageToken)
	}
	q += ` ORDER BY t.spiffe_id`
	if size > 0 {
		q += ` LIMIT ?`
		args = append(args, size+1)
	}
	rows, err := s.query(ctx, q, args...)
	if err != nil {
		return nil, "", fmt.Errorf("listing nodes: %w", err)
	}
	defer rows.Close()
	var out []*Node
	for rows.Next() {
		n, err := scanNode(rows)
		if err != nil {
			return nil, "", fmt.Errorf("listing nodes: %w", err)
		}
		out = append(out, n)
	}
	if err := rows.Err(); err != nil {
		return nil, "", fmt.Errorf("listing nodes: %w", err)
	}
	next := ""
	if size > 0 && len(out) > size {
		out = out[:size]
		next = out[size-1].SPIFFEID
	}
	return out, next, nil
}

// DeleteNode implements Store.
func (s *SQLStore) DeleteNode(ctx context.Context, spiffeID string) error {
	err := s.write(ctx, func(t *tx) error {
		res, err := t.exec(ctx, `DELETE FROM nodes WHERE spiffe_id = ?`, spiffeID)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return ErrNotFound
		}
		return t.event(ctx, EventNode, spiffeID, OpDelete)
	})
	if err != nil {
		return fmt.Errorf("evicting node %s: %w", spiffeID, err)
	}
	return nil
}

// BanNode implements Store.
func (s *SQLStore) BanNode(ctx context.Context, spiffeID string) (*Node, error) {
	var n *Node
	err := s.write(ctx, func(t *tx) error {
		res, err := t.exec(ctx, `UPDATE nodes SET banned = 1, cert_serial = '', updated_at = ? WHERE spiffe_id = ?`,
			t.now.UnixNano(), spiffeID)
		if err != nil {
			return err
		}
		if c, err := res.RowsAffected(); err != nil {
			return err
		} else if c == 0 {
			return ErrNotFound
		}
		if n, err = scanNode(t.queryRow(ctx, `SELECT `+nodeColumns+` FROM nodes t WHERE t.spiffe_id = ?`, spiffeID)); err != nil {
			return fmt.Errorf("reading banned node: %w", err)
		}
		return t.event(ctx, EventNode, spiffeID, OpBan)
	})
	if err != nil {
		return nil, fmt.Errorf("banning node %s: %w", spiffeID, err)
	}
	return n, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
