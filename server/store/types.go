package store

import (
	"time"
)

// Node is an attested agent: the record that attestation writes and that
// the Sync and signing APIs consult. A node is identified by its agent
// SPIFFE ID (spiffe://<td>/ironroot/agent/tpm/<ekhash>).
type Node struct {
	// SPIFFEID is the agent's SPIFFE ID; it is the primary key.
	SPIFFEID string
	// EKHash is the lowercase hex SHA-256 of the EK public key's PKIX DER.
	EKHash string
	// Selectors are the node selectors from the latest attestation, kept
	// sorted and deduplicated.
	Selectors []Selector
	// Evidence is the server's JSON summary of the attestation evidence
	// (manufacturer, PCRs, secure boot, EK chain); opaque to the store.
	Evidence []byte
	// CertSerial is the serial number of the agent's current SVID (decimal or
	// hex, as the CA chooses). Empty once the node is banned.
	CertSerial string
	// CertNotAfter is when the agent's current SVID expires.
	CertNotAfter time.Time
	// Banned refuses the node's SVID and any re-attestation until the node
	// is evicted (deleted).
	Banned bool
	// Clock is the opaque JSON of the TPM clock info seen at attestation,
	// kept to detect TPM resets and clock rollback across re-attestations.
	Clock []byte
	// CreatedAt is when the node first attested; re-attestation keeps it.
	CreatedAt time.Time
	// UpdatedAt is when the record last changed.
	UpdatedAt time.Time
}

// Entry is a registration entry: the SPIFFE ID that workloads (or, for node
// aliases, agents) matching Selectors under ParentID are entitled to.
type Entry struct {
	// ID is assigned by the store (a random UUID) when empty at creation.
	ID string
	// SPIFFEID is the identity issued to matching workloads.
	SPIFFEID string
	// ParentID is the agent ID, the server ID for a node alias, or the
	// SPIFFE ID of another entry.
	ParentID string
	// Selectors has set semantics: the store keeps them sorted and
	// deduplicated.
	Selectors []Selector
	// X509SVIDTTL is the X509-SVID lifetime in seconds; 0 means the server's
	// default.
	X509SVIDTTL int32
	// JWTSVIDTTL is the JWT-SVID lifetime in seconds; 0 means the server's
	// default.
	JWTSVIDTTL int32
	// DNSNames are put as DNS SANs into the entry's X509-SVIDs.
	DNSNames []string
	// Hint is an operator-chosen label passed to workloads.
	Hint string
	// RevisionNumber starts at 0 and increases with every update.
	RevisionNumber int64
	// CreatedAt is when the entry was created.
	CreatedAt time.Time
	// UpdatedAt is when the entry was last created or updated.
	UpdatedAt time.Time
}

// Clone returns a deep copy of e, so callers may modify it freely.
func (e *Entry) Clone() *Entry {
	if e == nil {
		return nil
	}
	c := *e
	c.Selectors = append([]Selector(nil), e.Selectors...)
	c.DNSNames = append([]string(nil), e.DNSNames...)
	return &c
}

// Clone returns a deep copy of n.
func (n *Node) Clone() *Node {
	if n == nil {
		return nil
	}
	c := *n
	c.Selectors = append([]Selector(nil), n.Selectors...)
	c.Evidence = append([]byte(nil), n.Evidence...)
	c.Clock = append([]byte(nil), n.Clock...)
	return &c
}

// AuthorityKind names the type of a signing authority.
type AuthorityKind string

const (
	// AuthorityX509 is an X.509 CA authority.
	AuthorityX509 AuthorityKind = "x509"
	// AuthorityJWT is a JWT signing authority.
	AuthorityJWT AuthorityKind = "jwt"
)

// AuthorityState is the rotation slot state of an authority.
type AuthorityState string

const (
	// StatePrepared is a key generated and published in the bundle but not
	// yet used for signing.
	StatePrepared AuthorityState = "prepared"
	// StateActive is the key that signs; at most one per kind.
	StateActive AuthorityState = "active"
	// StateOld is a retired key kept until everything it signed expired.
	StateOld AuthorityState = "old"
)

// Authority is one CA journal record. The key itself lives in the HSM; the
// store keeps only the reference to it (token, CKA_ID, label) and the public
// half. There is deliberately no field that could hold private key material.
type Authority struct {
	// Kind is AuthorityX509 or AuthorityJWT.
	Kind AuthorityKind
	// ID is the slot identifier, such as "x509-CA-3" or "JWT-Signer-3".
	ID string
	// State is the slot state.
	State AuthorityState
	// KeyToken is the PKCS#11 token label holding the key.
	KeyToken string
	// KeyID is the key's CKA_ID.
	KeyID []byte
	// KeyLabel is the key's CKA_LABEL.
	KeyLabel string
	// Certificate is the CA certificate (DER); required for X.509
	// authorities.
	Certificate []byte
	// PublicKey is the PKIX DER public key; required for JWT authorities.
	PublicKey []byte
	// KeyIDJWT is the JWT "kid"; required for JWT authorities.
	KeyIDJWT string
	// NotBefore is when the authority starts being valid.
	NotBefore time.Time
	// NotAfter is when the authority expires.
	NotAfter time.Time
	// CreatedAt is when the record was first stored.
	CreatedAt time.Time
	// UpdatedAt is when the record last changed.
	UpdatedAt time.Time
}

// EventKind names what an event is about.
type EventKind string

const (
	// EventEntry is a registration entry change; ObjectID is the entry ID.
	EventEntry EventKind = "entry"
	// EventNode is an attested node change; ObjectID is the agent ID.
	EventNode EventKind = "node"
	// EventBundle is a CA journal or bundle sequence change; ObjectID is
	// "<kind>/<id>" of the authority, or "sequence".
	EventBundle EventKind = "bundle"
)

// EventOp names the change an event records.
type EventOp string

const (
	// OpCreate records a creation.
	OpCreate EventOp = "create"
	// OpUpdate records an update (including node re-attestation).
	OpUpdate EventOp = "update"
	// OpDelete records a deletion (entry delete, node eviction).
	OpDelete EventOp = "delete"
	// OpBan records a node ban.
	OpBan EventOp = "ban"
)

// Event is one record of the change feed. Events are appended in the same
// transaction as the change they describe, so a rolled-back change leaves
// no event.
type Event struct {
	// ID increases with every committed change.
	ID int64
	// Kind is what changed.
	Kind EventKind
	// ObjectID identifies the changed object (entry ID, agent ID, ...).
	ObjectID string
	// Op is how it changed.
	Op EventOp
	// CreatedAt is the commit time.
	CreatedAt time.Time
}

// MatchMode says how a selector filter compares against a record's
// selectors.
type MatchMode int

const (
	// MatchExact matches records whose selector set equals the filter's.
	MatchExact MatchMode = iota
	// MatchSubset matches records whose selectors are all in the filter
	// (record ⊆ filter): "which entries would these selectors satisfy".
	MatchSubset
	// MatchSuperset matches records that have every filter selector
	// (record ⊇ filter).
	MatchSuperset
	// MatchAny matches records that share at least one selector with the
	// filter.
	MatchAny
)

// SelectorFilter restricts a listing by selectors.
type SelectorFilter struct {
	// Selectors to compare against; must not be empty.
	Selectors []Selector
	// Match is the comparison.
	Match MatchMode
}

// ListEntriesRequest filters and pages ListEntries. Zero fields do not
// filter.
type ListEntriesRequest struct {
	// SPIFFEID keeps only entries with this SPIFFE ID.
	SPIFFEID string
	// ParentID keeps only entries with this parent ID.
	ParentID string
	// BySelectors keeps only entries matching the filter.
	BySelectors *SelectorFilter
	// PageSize limits the entries returned; 0 returns all.
	PageSize int
	// PageToken continues a previous listing (its returned next token).
	PageToken string
}

// ListNodesRequest filters and pages ListNodes. Zero fields do not filter.
type ListNodesRequest struct {
	// Banned keeps only banned (true) or only non-banned (false) nodes.
	Banned *bool
	// BySelectors keeps only nodes matching the filter.
	BySelectors *SelectorFilter
	// PageSize limits the nodes returned; 0 returns all.
	PageSize int
	// PageToken continues a previous listing (its returned next token).
	PageToken string
}
