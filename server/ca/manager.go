package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/server/store"
)

// KeyRef addresses a key on a token: the store keeps these, never keys.
type KeyRef struct {
	// Token is the token label.
	Token string
	// ID is the key's CKA_ID.
	ID []byte
	// Label is the key's CKA_LABEL.
	Label string
}

// Key is a signing key held by a KeyStore.
type Key interface {
	crypto.Signer
	// Ref returns the key's reference.
	Ref() KeyRef
	// URI returns the key's pkcs11: URI for people (no PIN).
	URI() string
}

// KeyStore generates, finds and destroys the CA's keys (an HSM through
// PKCS#11 in production). GenerateKey must never overwrite an existing key.
type KeyStore interface {
	GenerateKey(ctx context.Context, keyType, label string) (Key, error)
	FindKey(ctx context.Context, ref KeyRef) (Key, error)
	DestroyKey(ctx context.Context, ref KeyRef) error
}

// Upstream is an operator CA the server's CA is an intermediate under.
type Upstream struct {
	// Chain is the upstream CA certificate first, then its issuers up to and
	// including the root.
	Chain []*x509.Certificate
	// Signer is the upstream CA's key.
	Signer crypto.Signer
}

// Config configures a Manager.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	Store       store.Store
	Keys        KeyStore
	// X509KeyType and JWTKeyType are ec-p256 (default), ec-p384, rsa-2048,
	// rsa-3072 or rsa-4096.
	X509KeyType string
	JWTKeyType  string
	// TTL is each CA certificate's and JWT key's lifetime (default 24h).
	TTL time.Duration
	// Subject of CA certificates (default C=US, O=SPIFFE).
	Subject pkix.Name
	// Upstream, if set, signs the CA certificates.
	Upstream *Upstream
	// Clock returns the current time (default time.Now).
	Clock func() time.Time
	// Logger receives rotation events.
	Logger *slog.Logger
}

// X509Authority is one X.509 CA slot.
type X509Authority struct {
	Record *store.Authority
	Cert   *x509.Certificate
	Key    Key
}

// JWTAuthority is one JWT signing key slot.
type JWTAuthority struct {
	Record    *store.Authority
	KeyID     string
	PublicKey crypto.PublicKey
	Key       Key
}

// Bundle is the trust domain's current bundle.
type Bundle struct {
	TrustDomain spiffeid.TrustDomain
	// X509Authorities are the root CA certificates relying parties trust.
	X509Authorities []*x509.Certificate
	// JWTAuthorities are the JWT public keys by kid, with their expiry.
	JWTAuthorities []JWTKey
	// Sequence is the bundle's spiffe_sequence.
	Sequence int64
}

// JWTKey is a JWT authority in the bundle.
type JWTKey struct {
	KeyID     string
	PublicKey crypto.PublicKey
	NotAfter  time.Time
}

// Manager keeps the CA's key slots, rotates them and signs with the active
// ones. Rotation follows SPIRE: a new key is prepared (and published) at 1/2
// of the active one's lifetime and activated at 5/6; the retired key stays
// in the bundle, and on the token, until everything it signed has expired.
type Manager struct {
	cfg Config
	log *slog.Logger

	mu     sync.RWMutex
	x509   []*X509Authority // every slot, sorted by NotBefore
	jwt    []*JWTAuthority
	bundle Bundle

	subs store.Notifier
}

// NewManager loads the CA journal from the store, finds every key on the
// token and checks it signs for its certificate, then makes sure there is
// an active X.509 CA and JWT key (generating them on first start). It
// refuses to start when a recorded key is missing or does not match.
func NewManager(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Store == nil || cfg.Keys == nil || cfg.TrustDomain.IsZero() {
		return nil, errors.New("CA manager: store, key store and trust domain are required")
	}
	if cfg.X509KeyType == "" {
		cfg.X509KeyType = "ec-p256"
	}
	if cfg.JWTKeyType == "" {
		cfg.JWTKeyType = "ec-p256"
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 24 * time.Hour
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Upstream != nil && (len(cfg.Upstream.Chain) == 0 || cfg.Upstream.Signer == nil) {
		return nil, errors.New("CA manager: upstream needs its certificate chain and signer")
	}
	m := &Manager{cfg: cfg, log: cfg.Logger}
	if err := m.load(ctx); err != nil {
		return nil, err
	}
	m.mu.Lock()
	_, err := m.rotateLocked(ctx)
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	// Publish even when the journal was current: the bundle lives in
	// memory only.
	if err := m.publish(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Manager) load(ctx context.Context) error {
	recs, err := m.cfg.Store.ListAuthorities(ctx, "")
	if err != nil {
		return fmt.Errorf("loading CA journal: %w", err)
	}
	for _, r := range recs {
		key, err := m.cfg.Keys.FindKey(ctx, KeyRef{Token: r.KeyToken, ID: r.KeyID, Label: r.KeyLabel})
		if err != nil {
			return fmt.Errorf("%s authority %s: its key (token %q, id %x, label %q) could not be found on the HSM: %w",
				r.Kind, r.ID, r.KeyToken, r.KeyID, r.KeyLabel, err)
		}
		switch r.Kind {
		case store.AuthorityX509:
			cert, err := x509.ParseCertificate(r.Certificate)
			if err != nil {
				return fmt.Errorf("x509 authority %s: parsing its certificate: %w", r.ID, err)
			}
			if err := checkKey(key, cert.PublicKey); err != nil {
				return fmt.Errorf("x509 authority %s: the HSM key %s does not match its certificate: %w", r.ID, key.URI(), err)
			}
			m.x509 = append(m.x509, &X509Authority{Record: r, Cert: cert, Key: key})
		case store.AuthorityJWT:
			pub, err := x509.ParsePKIXPublicKey(r.PublicKey)
			if err != nil {
				return fmt.Errorf("jwt authority %s: parsing its public key: %w", r.ID, err)
			}
			if err := checkKey(key, pub); err != nil {
				return fmt.Errorf("jwt authority %s: the HSM key %s does not match its public key: %w", r.ID, key.URI(), err)
			}
			m.jwt = append(m.jwt, &JWTAuthority{Record: r, KeyID: r.KeyIDJWT, PublicKey: pub, Key: key})
		default:
			return fmt.Errorf("CA journal: authority %s has unknown kind %q", r.ID, r.Kind)
		}
	}
	m.sortSlots()
	return nil
}

// checkKey signs a random digest with key and verifies it with pub: the
// start-up self-test that the token still holds the key the journal names.
func checkKey(key crypto.Signer, pub crypto.PublicKey) error {
	if !publicKeysEqual(key.Public(), pub) {
		return errors.New("public keys differ")
	}
	var msg [32]byte
	if _, err := rand.Read(msg[:]); err != nil {
		return fmt.Errorf("reading random: %w", err)
	}
	digest := sha256.Sum256(msg[:])
	opts := crypto.SignerOpts(crypto.SHA256)
	sig, err := key.Sign(rand.Reader, digest[:], opts)
	if err != nil {
		return fmt.Errorf("signing test digest: %w", err)
	}
	if err := verifySignature(pub, digest[:], sig); err != nil {
		return fmt.Errorf("verifying test signature: %w", err)
	}
	return nil
}

func (m *Manager) sortSlots() {
	sort.Slice(m.x509, func(i, j int) bool { return m.x509[i].Record.NotBefore.Before(m.x509[j].Record.NotBefore) })
	sort.Slice(m.jwt, func(i, j int) bool { return m.jwt[i].Record.NotBefore.Before(m.jwt[j].Record.NotBefore) })
}

// Rotate runs one rotation step: prepare, activate, retire and destroy as
// the clock requires. Call it periodically (Run does).
func (m *Manager) Rotate(ctx context.Context) error {
	m.mu.Lock()
	changed, err := m.rotateLocked(ctx)
	m.mu.Unlock()
	if err != nil {
		return err
	}
	if changed {
		return m.publish(ctx)
	}
	return nil
}

// Run rotates every interval until ctx ends. Errors are logged, not fatal:
// the active key keeps signing while the HSM recovers.
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := m.Rotate(ctx); err != nil {
				m.log.Error("CA rotation failed", "error", err)
			}
		}
	}
}

// thresholds returns when the slot after one valid [nb, na) is prepared and
// activated: at 1/2 and 5/6 of its lifetime (capped at 30 and 7 days before
// expiry, as SPIRE does).
func thresholds(nb, na time.Time) (prepare, activate time.Time) {
	life := na.Sub(nb)
	prep := min(life/2, 30*24*time.Hour)
	act := min(life/6, 7*24*time.Hour)
	return na.Add(-prep), na.Add(-act)
}

func (m *Manager) rotateLocked(ctx context.Context) (bool, error) {
	now := m.cfg.Clock()
	x509Changed, err := m.rotateKind(ctx, now, m.x509Records, func() error {
		_, err := m.prepareX509(ctx, now)
		return err
	})
	if err != nil {
		return x509Changed, err
	}
	jwtChanged, err := m.rotateKind(ctx, now, m.jwtRecords, func() error {
		_, err := m.prepareJWT(ctx, now)
		return err
	})
	if err != nil {
		return x509Changed || jwtChanged, err
	}
	pruned, err := m.pruneLocked(ctx, now)
	return x509Changed || jwtChanged || pruned, err
}

// rotateKind runs the rotation step for one kind of authority: prepare the
// next key at 1/2 of the active one's lifetime, activate it at 5/6 — or at
// once on first start, or when the active one expired while the server was
// down.
func (m *Manager) rotateKind(ctx context.Context, now time.Time, records func() (active, prepared *store.Authority), prepare func() error) (bool, error) {
	active, prepared := records()
	changed := false
	if active != nil && active.NotAfter.After(now) {
		prep, act := thresholds(active.NotBefore, active.NotAfter)
		if prepared == nil && !now.Before(prep) {
			if err := prepare(); err != nil {
				return changed, err
			}
			changed = true
			_, prepared = records()
		}
		if prepared == nil || now.Before(act) {
			return changed, nil
		}
	} else if prepared == nil {
		if err := prepare(); err != nil {
			return changed, err
		}
		_, prepared = records()
	}
	if err := m.activate(ctx, active, prepared); err != nil {
		return changed, err
	}
	return true, nil
}

// x509Records and jwtRecords return the journal records of the active and
// prepared slots of a kind.
func (m *Manager) x509Records() (active, prepared *store.Authority) {
	a, p := m.x509Slots()
	return a.record(), p.record()
}

func (m *Manager) jwtRecords() (active, prepared *store.Authority) {
	a, p := m.jwtSlots()
	return a.record(), p.record()
}

func (a *X509Authority) key() Key { return a.Key }
func (a *JWTAuthority) key() Key  { return a.Key }

// record returns the slot's journal record; nil for no slot.
func (a *X509Authority) record() *store.Authority {
	if a == nil {
		return nil
	}
	return a.Record
}

// record returns the slot's journal record; nil for no slot.
func (a *JWTAuthority) record() *store.Authority {
	if a == nil {
		return nil
	}
	return a.Record
}

func (m *Manager) x509Slots() (active, prepared *X509Authority) {
	for _, a := range m.x509 {
		switch a.Record.State {
		case store.StateActive:
			active = a
		case store.StatePrepared:
			prepared = a
		}
	}
	return active, prepared
}

func (m *Manager) jwtSlots() (active, prepared *JWTAuthority) {
	for _, a := range m.jwt {
		switch a.Record.State {
		case store.StateActive:
			active = a
		case store.StatePrepared:
			prepared = a
		}
	}
	return active, prepared
}

// slotID names a new slot; the time orders it for people and the random
// suffix keeps token labels unique, since keys are never overwritten.
func slotID(prefix string, now time.Time) (string, error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("naming key slot: %w", err)
	}
	return fmt.Sprintf("%s-%s-%x", prefix, now.UTC().Format("20060102T150405"), b), nil
}

func (m *Manager) prepareX509(ctx context.Context, now time.Time) (*X509Authority, error) {
	id, err := slotID("x509-CA", now)
	if err != nil {
		return nil, err
	}
	key, err := m.cfg.Keys.GenerateKey(ctx, m.cfg.X509KeyType, "ironroot-"+id)
	if err != nil {
		return nil, fmt.Errorf("generating X.509 CA key %s on the HSM: %w", id, err)
	}
	p := CAParams{TrustDomain: m.cfg.TrustDomain, Signer: key, NotBefore: now, TTL: m.cfg.TTL, Subject: m.cfg.Subject}
	if up := m.cfg.Upstream; up != nil {
		p.Parent, p.ParentSigner = up.Chain[0], up.Signer
	}
	cert, err := NewCACertificate(p)
	if err != nil {
		m.destroyQuietly(ctx, key.Ref())
		return nil, fmt.Errorf("creating X.509 CA %s: %w", id, err)
	}
	ref := key.Ref()
	rec := &store.Authority{
		Kind: store.AuthorityX509, ID: id, State: store.StatePrepared,
		KeyToken: ref.Token, KeyID: ref.ID, KeyLabel: ref.Label,
		Certificate: cert.Raw, NotBefore: cert.NotBefore, NotAfter: cert.NotAfter,
	}
	if err := m.cfg.Store.PutAuthority(ctx, rec); err != nil {
		m.destroyQuietly(ctx, ref)
		return nil, fmt.Errorf("recording X.509 CA %s: %w", id, err)
	}
	a := &X509Authority{Record: rec, Cert: cert, Key: key}
	m.x509 = append(m.x509, a)
	m.sortSlots()
	m.log.Info("X.509 CA prepared", "slot", id, "key", key.URI(), "not_after", cert.NotAfter)
	return a, nil
}

// activate makes the prepared slot active and the active one old, in the
// journal first (one transaction), then in memory.
func (m *Manager) activate(ctx context.Context, active, prepared *store.Authority) error {
	recs := []*store.Authority{withState(prepared, store.StateActive)}
	if active != nil {
		recs = append(recs, withState(active, store.StateOld))
	}
	if err := m.cfg.Store.PutAuthority(ctx, recs...); err != nil {
		return fmt.Errorf("activating %s authority %s: %w", prepared.Kind, prepared.ID, err)
	}
	// Records are only read under m.mu or through the copies the accessors
	// return, so they can be updated in place.
	prepared.State = store.StateActive
	if active != nil {
		active.State = store.StateOld
	}
	m.log.Info("authority activated", "kind", prepared.Kind, "slot", prepared.ID)
	return nil
}

func (m *Manager) prepareJWT(ctx context.Context, now time.Time) (*JWTAuthority, error) {
	id, err := slotID("JWT-Signer", now)
	if err != nil {
		return nil, err
	}
	key, err := m.cfg.Keys.GenerateKey(ctx, m.cfg.JWTKeyType, "ironroot-"+id)
	if err != nil {
		return nil, fmt.Errorf("generating JWT key %s on the HSM: %w", id, err)
	}
	if _, err := JWTAlgorithm(key.Public()); err != nil {
		m.destroyQuietly(ctx, key.Ref())
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		m.destroyQuietly(ctx, key.Ref())
		return nil, fmt.Errorf("encoding JWT key %s: %w", id, err)
	}
	var kidBytes [16]byte
	if _, err := rand.Read(kidBytes[:]); err != nil {
		m.destroyQuietly(ctx, key.Ref())
		return nil, fmt.Errorf("making JWT key ID: %w", err)
	}
	ref := key.Ref()
	rec := &store.Authority{
		Kind: store.AuthorityJWT, ID: id, State: store.StatePrepared,
		KeyToken: ref.Token, KeyID: ref.ID, KeyLabel: ref.Label,
		PublicKey: pubDER, KeyIDJWT: hex.EncodeToString(kidBytes[:]),
		NotBefore: now.UTC(), NotAfter: now.Add(m.cfg.TTL).UTC(),
	}
	if up := m.cfg.Upstream; up != nil && rec.NotAfter.After(up.Chain[0].NotAfter) {
		rec.NotAfter = up.Chain[0].NotAfter
	}
	if err := m.cfg.Store.PutAuthority(ctx, rec); err != nil {
		m.destroyQuietly(ctx, ref)
		return nil, fmt.Errorf("recording JWT key %s: %w", id, err)
	}
	a := &JWTAuthority{Record: rec, KeyID: rec.KeyIDJWT, PublicKey: key.Public(), Key: key}
	m.jwt = append(m.jwt, a)
	m.sortSlots()
	m.log.Info("JWT key prepared", "slot", id, "kid", rec.KeyIDJWT, "key", key.URI(), "not_after", rec.NotAfter)
	return a, nil
}

// pruneLocked destroys old keys once everything they signed has expired:
// SVIDs and tokens never outlive their signer, so that is the signer's own
// NotAfter.
func (m *Manager) pruneLocked(ctx context.Context, now time.Time) (bool, error) {
	var changed, c bool
	var err error
	if m.x509, c, err = pruneSlots(ctx, m, m.x509, now); err != nil {
		return c, err
	}
	changed = c
	m.jwt, c, err = pruneSlots(ctx, m, m.jwt, now)
	return changed || c, err
}

// pruneSlots retires every old slot past its NotAfter and returns the rest.
func pruneSlots[S interface {
	record() *store.Authority
	key() Key
}](ctx context.Context, m *Manager, slots []S, now time.Time) ([]S, bool, error) {
	changed := false
	keep := slots[:0]
	for i, a := range slots {
		rec := a.record()
		if rec.State == store.StateOld && !rec.NotAfter.After(now) {
			if err := m.retire(ctx, rec, a.key()); err != nil {
				return append(keep, slots[i:]...), changed, err
			}
			changed = true
			continue
		}
		keep = append(keep, a)
	}
	return keep, changed, nil
}

func (m *Manager) retire(ctx context.Context, rec *store.Authority, key Key) error {
	// Destroy first: a journal record without a key would stop the next
	// start-up, which is louder than a leftover key.
	if err := m.cfg.Keys.DestroyKey(ctx, key.Ref()); err != nil {
		return fmt.Errorf("destroying expired %s key %s: %w", rec.Kind, rec.ID, err)
	}
	if err := m.cfg.Store.DeleteAuthority(ctx, rec.Kind, rec.ID); err != nil {
		return fmt.Errorf("removing expired %s authority %s from the journal: %w", rec.Kind, rec.ID, err)
	}
	m.log.Info("expired key destroyed", "kind", rec.Kind, "slot", rec.ID, "key", key.URI())
	return nil
}

func (m *Manager) destroyQuietly(ctx context.Context, ref KeyRef) {
	if err := m.cfg.Keys.DestroyKey(ctx, ref); err != nil {
		m.log.Warn("could not destroy a key left by a failed rotation", "label", ref.Label, "error", err)
	}
}

func withState(r *store.Authority, s store.AuthorityState) *store.Authority {
	c := *r
	c.State = s
	return &c
}

// publish recomputes the bundle, bumps its sequence and wakes subscribers.
func (m *Manager) publish(ctx context.Context) error {
	seq, err := m.cfg.Store.BumpBundleSequence(ctx)
	if err != nil {
		return fmt.Errorf("bumping bundle sequence: %w", err)
	}
	m.mu.Lock()
	b := Bundle{TrustDomain: m.cfg.TrustDomain, Sequence: seq}
	now := m.cfg.Clock()
	if up := m.cfg.Upstream; up != nil {
		b.X509Authorities = []*x509.Certificate{up.Chain[len(up.Chain)-1]}
	} else {
		for _, a := range m.x509 {
			if a.Cert.NotAfter.After(now) {
				b.X509Authorities = append(b.X509Authorities, a.Cert)
			}
		}
	}
	for _, a := range m.jwt {
		if a.Record.NotAfter.After(now) {
			b.JWTAuthorities = append(b.JWTAuthorities, JWTKey{KeyID: a.KeyID, PublicKey: a.PublicKey, NotAfter: a.Record.NotAfter})
		}
	}
	m.bundle = b
	m.mu.Unlock()

	m.subs.Notify()
	return nil
}

// Bundle returns the current bundle.
func (m *Manager) Bundle() Bundle {
	m.mu.RLock()
	defer m.mu.RUnlock()
	b := m.bundle
	b.X509Authorities = append([]*x509.Certificate(nil), b.X509Authorities...)
	b.JWTAuthorities = append([]JWTKey(nil), b.JWTAuthorities...)
	return b
}

// SubscribeBundle returns a channel signalled (coalesced) whenever the
// bundle changes, and a cancel function.
func (m *Manager) SubscribeBundle() (<-chan struct{}, func()) { return m.subs.Subscribe() }

// X509Authorities returns copies of every X.509 slot (prepared, active and
// old).
func (m *Manager) X509Authorities() []*X509Authority {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*X509Authority, 0, len(m.x509))
	for _, a := range m.x509 {
		c := *a
		rec := *a.Record
		c.Record = &rec
		out = append(out, &c)
	}
	return out
}

// JWTAuthorities returns copies of every JWT slot.
func (m *Manager) JWTAuthorities() []*JWTAuthority {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*JWTAuthority, 0, len(m.jwt))
	for _, a := range m.jwt {
		c := *a
		rec := *a.Record
		c.Record = &rec
		out = append(out, &c)
	}
	return out
}

// SignX509SVID signs an X509-SVID with the active CA and returns the chain
// to send: the SVID, the CA certificate and, under an upstream CA, its
// intermediates (the root stays in the bundle).
func (m *Manager) SignX509SVID(p SVIDParams) ([]*x509.Certificate, error) {
	m.mu.RLock()
	active, _ := m.x509Slots()
	m.mu.RUnlock()
	if active == nil {
		return nil, errors.New("signing X509-SVID: no active CA")
	}
	svid, err := SignX509SVID(active.Cert, active.Key, p)
	if err != nil {
		return nil, err
	}
	chain := []*x509.Certificate{svid}
	if up := m.cfg.Upstream; up != nil {
		chain = append(chain, active.Cert)
		chain = append(chain, up.Chain[:len(up.Chain)-1]...)
	}
	return chain, nil
}

// SignJWTSVID signs a JWT-SVID with the active JWT key.
func (m *Manager) SignJWTSVID(p JWTParams) (string, time.Time, error) {
	m.mu.RLock()
	active, _ := m.jwtSlots()
	m.mu.RUnlock()
	if active == nil {
		return "", time.Time{}, errors.New("signing JWT-SVID: no active JWT key")
	}
	p.KeyNotAfter = active.Record.NotAfter
	return SignJWTSVID(active.Key, active.KeyID, p)
}

// ActiveCA returns the active CA certificate.
func (m *Manager) ActiveCA() *x509.Certificate {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if a, _ := m.x509Slots(); a != nil {
		return a.Cert
	}
	return nil
}
