-- Ironroot store schema, version 1.
-- Times are Unix nanoseconds (BIGINT, 0 = unset); booleans are SMALLINT 0/1;
-- selector sets are kept as canonical JSON on the row (fast full loads) and
-- one row per selector in *_selectors (filtering). There is no column for
-- private key material anywhere.

CREATE TABLE nodes (
    spiffe_id      TEXT PRIMARY KEY,
    ek_hash        TEXT NOT NULL DEFAULT '',
    selectors      TEXT NOT NULL DEFAULT '[]',
    evidence       BLOB,
    cert_serial    TEXT NOT NULL DEFAULT '',
    cert_not_after BIGINT NOT NULL DEFAULT 0,
    banned         SMALLINT NOT NULL DEFAULT 0,
    clock          BLOB,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX nodes_ek_hash ON nodes (ek_hash);

CREATE TABLE node_selectors (
    node_id  TEXT NOT NULL REFERENCES nodes (spiffe_id) ON DELETE CASCADE,
    selector TEXT NOT NULL,
    PRIMARY KEY (node_id, selector)
);
CREATE INDEX node_selectors_selector ON node_selectors (selector);

CREATE TABLE entries (
    id             TEXT PRIMARY KEY,
    spiffe_id      TEXT NOT NULL,
    parent_id      TEXT NOT NULL,
    selectors      TEXT NOT NULL,
    selectors_hash TEXT NOT NULL,
    x509_svid_ttl  INTEGER NOT NULL DEFAULT 0,
    jwt_svid_ttl   INTEGER NOT NULL DEFAULT 0,
    dns_names      TEXT NOT NULL DEFAULT '[]',
    hint           TEXT NOT NULL DEFAULT '',
    revision       BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    UNIQUE (spiffe_id, parent_id, selectors_hash)
);
CREATE INDEX entries_parent_id ON entries (parent_id);

CREATE TABLE entry_selectors (
    entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    selector TEXT NOT NULL,
    PRIMARY KEY (entry_id, selector)
);
CREATE INDEX entry_selectors_selector ON entry_selectors (selector);

CREATE TABLE authorities (
    kind        TEXT NOT NULL CHECK (kind IN ('x509', 'jwt')),
    id          TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('prepared', 'active', 'old')),
    key_token   TEXT NOT NULL DEFAULT '',
    key_id      BLOB,
    key_label   TEXT NOT NULL DEFAULT '',
    certificate BLOB,
    public_key  BLOB,
    kid         TEXT NOT NULL DEFAULT '',
    not_before  BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('bundle_sequence', 0);
INSERT INTO counters (name, value) VALUES ('events_pruned_through', 0);

-- Dialect point: PostgreSQL uses BIGINT GENERATED ALWAYS AS IDENTITY.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    object_id  TEXT NOT NULL,
    op         TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_created_at ON events (created_at);
