package agent

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/tpm"
)

// Files in the data directory. The key blob is the TPM-wrapped key: only
// this host's TPM can load it, so it is not a secret on disk.
const (
	svidFile    = "agent_svid.pem"
	keyBlobFile = "agent_key.tpmblob"
	bundleFile  = "bundle.pem"
)

// identity is the agent's current SVID and TPM key, shared by the TLS
// configuration (as an x509svid.Source) and the renewal loop. It also
// serves the trust bundle that authenticates the server.
type identity struct {
	td spiffeid.TrustDomain

	mu     sync.RWMutex
	svid   *x509svid.SVID
	key    *tpm.Key
	renew  time.Time // when svid is due for renewal
	bundle *x509bundle.Bundle
}

// GetX509SVID implements x509svid.Source for the mTLS client config.
func (i *identity) GetX509SVID() (*x509svid.SVID, error) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.svid == nil {
		return nil, errors.New("the agent has no SVID yet")
	}
	return i.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (i *identity) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if td != i.td || i.bundle == nil {
		return nil, fmt.Errorf("no bundle for trust domain %s", td)
	}
	return i.bundle, nil
}

// renewTime is when the current SVID is due for renewal.
func (i *identity) renewTime() time.Time {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.renew
}

// current returns the SVID (nil before the first attestation).
func (i *identity) current() *x509svid.SVID {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.svid
}

// set installs a new SVID and key, closing the previous key (its TLS
// sessions are already established; new handshakes use the new key).
// received is when the server issued it to this agent; zero for an SVID
// resumed from the data directory.
func (i *identity) set(chain []*x509.Certificate, key *tpm.Key, received time.Time) error {
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return fmt.Errorf("agent SVID: %w", err)
	}
	i.mu.Lock()
	old := i.key
	i.svid = &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	i.key = key
	i.renew = renewAt(chain[0], received)
	i.mu.Unlock()
	if old != nil && old != key {
		old.Close()
	}
	return nil
}

// setBundle replaces the trust bundle (from attestation or Sync).
func (i *identity) setBundle(b *agentv1.Bundle) error {
	if b == nil || len(b.X509Authorities) == 0 {
		return nil
	}
	var certs []*x509.Certificate
	for _, der := range b.X509Authorities {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("parsing bundle certificate: %w", err)
		}
		certs = append(certs, c)
	}
	i.mu.Lock()
	i.bundle = x509bundle.FromX509Authorities(i.td, certs)
	i.mu.Unlock()
	return nil
}

func (i *identity) bundleCerts() []*x509.Certificate {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.bundle == nil {
		return nil
	}
	return i.bundle.X509Authorities()
}

func (i *identity) close() {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.key != nil {
		i.key.Close()
		i.key = nil
	}
	i.svid = nil
}

// loadBundleFile reads a PEM bundle (the -trustBundle file or the saved one).
func loadBundleFile(td spiffeid.TrustDomain, path string) (*x509bundle.Bundle, error) {
	b, err := x509bundle.Load(td, path)
	if err != nil {
		return nil, fmt.Errorf("reading trust bundle %s: %w", path, err)
	}
	if len(b.X509Authorities()) == 0 {
		return nil, fmt.Errorf("trust bundle %s holds no certificate", path)
	}
	return b, nil
}

// saved is what a previous run left in the data directory.
type saved struct {
	chain []*x509.Certificate
	blob  []byte
}

// loadSaved reads the saved SVID and key blob; (nil, nil) when absent.
func loadSaved(dir string) (*saved, error) {
	pemData, err := os.ReadFile(filepath.Join(dir, svidFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading saved SVID: %w", err)
	}
	blob, err := os.ReadFile(filepath.Join(dir, keyBlobFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading saved key blob: %w", err)
	}
	var chain []*x509.Certificate
	for rest := pemData; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing saved SVID: %w", err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, errors.New("saved SVID file holds no certificate")
	}
	return &saved{chain: chain, blob: blob}, nil
}

// save writes the SVID, key blob and bundle atomically (write, fsync,
// rename) so a crash never leaves a SVID beside another key's blob.
func save(dir string, chain []*x509.Certificate, blob []byte, bundle []*x509.Certificate) error {
	svidPEM, bundlePEM := pemCerts(chain), pemCerts(bundle)
	// The blob goes first: a new blob with an old SVID fails the key check
	// on resume and leads to a fresh attestation, never to a mismatch.
	if err := writeAtomic(filepath.Join(dir, keyBlobFile), blob); err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(dir, svidFile), svidPEM); err != nil {
		return err
	}
	if len(bundlePEM) > 0 {
		if err := writeAtomic(filepath.Join(dir, bundleFile), bundlePEM); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("saving %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("saving %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	return nil
}

// renewAt is when an SVID is renewed: at half its lifetime, as SPIRE does.
// The CA backdates NotBefore (10 s) for clock skew, which puts the
// midpoint of a short-lived SVID (TTL up to twice the backdate) at or
// before its issue: renewal would follow renewal without pause. So a fresh
// SVID is renewed no earlier than halfway from its receipt to NotAfter.
// received is zero for a resumed SVID, whose receipt is unknown.
func renewAt(cert *x509.Certificate, received time.Time) time.Time {
	mid := cert.NotBefore.Add(cert.NotAfter.Sub(cert.NotBefore) / 2)
	if received.IsZero() {
		return mid
	}
	if half := received.Add(cert.NotAfter.Sub(received) / 2); half.After(mid) {
		return half
	}
	return mid
}

// resume loads a saved identity if it is still within its lifetime and its
// key loads in this TPM and matches; otherwise the agent attests afresh.
func resume(ctx context.Context, t *tpm.TPM, dir string, td spiffeid.TrustDomain, now time.Time) ([]*x509.Certificate, *tpm.Key, error) {
	s, err := loadSaved(dir)
	if err != nil || s == nil {
		return nil, nil, err
	}
	leaf := s.chain[0]
	if !now.Before(leaf.NotAfter) {
		return nil, nil, nil
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || id.TrustDomain() != td {
		return nil, nil, nil
	}
	key, err := t.LoadKey(ctx, s.blob)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the saved TPM key: %w", err)
	}
	if eq, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(leaf.PublicKey) {
		key.Close()
		return nil, nil, errors.New("the saved TPM key does not match the saved SVID")
	}
	return s.chain, key, nil
}

// pemCerts encodes certificates as concatenated PEM blocks.
func pemCerts(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
