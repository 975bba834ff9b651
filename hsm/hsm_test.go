//go:build cgo

package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1" // SHA-1 digests for the refusal test
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

// The test binary's SoftHSM and its module: SoftHSM reads SOFTHSM2_CONF
// once per process and a module initialises once, so all tests share them and
// use a token each.
var (
	softHSM    *simulator.SoftHSM
	moduleOnce sync.Once
	module     *Module
	moduleErr  error
)

func TestMain(m *testing.M) { os.Exit(simtest.RunWithSoftHSM(m, &softHSM, 8)) }

func testModule(t testing.TB) *Module {
	t.Helper()
	moduleOnce.Do(func() {
		module, moduleErr = LoadModule(context.Background(), softHSM.ModulePath())
	})
	if moduleErr != nil {
		t.Fatalf("loading SoftHSM module: %v", moduleErr)
	}
	return module
}

// takeToken gives the test an empty token of its own. When the test ends
// (after its HSMs are closed) every object on it is destroyed and the token
// goes back to the prepared ones, so -count=N does not run out of tokens.
func takeToken(t testing.TB) *simulator.SoftHSMToken {
	t.Helper()
	m := testModule(t)
	tok := simtest.SoftHSMToken(t, softHSM)
	t.Cleanup(func() {
		ctx := context.Background()
		h, err := m.Open(ctx, tok.URI)
		if err != nil {
			t.Errorf("wiping token: %v", err)
			return
		}
		err = h.do(ctx, func(s *session) error {
			objs, err := h.findObjects(s, nil, 1000)
			if err != nil {
				return err
			}
			for _, o := range objs {
				if err := h.mod.ctx.DestroyObject(s.h, o); err != nil {
					return p11err("C_DestroyObject", err)
				}
			}
			return nil
		})
		if cerr := h.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Errorf("wiping token: %v", err)
			return
		}
		softHSM.ReturnToken(tok)
	})
	return tok
}

// openToken gives the test a token of its own and opens it.
func openToken(t testing.TB, opts ...Option) (*HSM, *simulator.SoftHSMToken) {
	t.Helper()
	m := testModule(t)
	tok := takeToken(t)
	h, err := m.Open(context.Background(), tok.URI, opts...)
	if err != nil {
		t.Fatalf("opening token %s: %v", tok.URI, err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("closing HSM: %v", err)
		}
	})
	return h, tok
}

func generate(t testing.TB, h *HSM, kt KeyType, label string) *Key {
	t.Helper()
	k, err := h.GenerateKey(context.Background(), kt, label)
	if err != nil {
		t.Fatalf("GenerateKey(%s, %q): %v", kt, label, err)
	}
	return k
}

func TestGenerateKeyAttributes(t *testing.T) {
	h, tok := openToken(t)
	ctx := context.Background()
	for _, kt := range []KeyType{ECP256, ECP384, RSA2048} {
		t.Run(kt.String(), func(t *testing.T) {
			label := "key-" + kt.String()
			k := generate(t, h, kt, label)
			a, err := k.Attributes(ctx)
			if err != nil {
				t.Fatalf("Attributes: %v", err)
			}
			want := KeyAttributes{Sensitive: true, Local: true, AlwaysSensitive: true, NeverExtractable: true, Sign: true}
			if a != want {
				t.Errorf("attributes = %+v, want %+v", a, want)
			}
			ref := k.Ref()
			if len(ref.ID) != idLen || ref.Label != label {
				t.Errorf("Ref() = %v", ref)
			}
			switch pub := k.Public().(type) {
			case *ecdsa.PublicKey:
				wantCurve := map[KeyType]elliptic.Curve{ECP256: elliptic.P256(), ECP384: elliptic.P384()}[kt]
				if pub.Curve != wantCurve {
					t.Errorf("curve = %v", pub.Curve.Params().Name)
				}
			case *rsa.PublicKey:
				if pub.N.BitLen() != 2048 || pub.E != 65537 {
					t.Errorf("RSA key %d bits e=%d", pub.N.BitLen(), pub.E)
				}
			default:
				t.Errorf("public key type %T", pub)
			}
			u, err := ParseURI(k.URI())
			if err != nil {
				t.Fatalf("key URI %q: %v", k.URI(), err)
			}
			if !bytes.Equal(u.ID, ref.ID) || u.Object != label || u.Type != "private" || u.Token != tok.Label ||
				u.ModulePath != tok.ModulePath || u.PINSource == "" {
				t.Errorf("key URI = %s", k.URI())
			}
			// Found again by ID alone, by label alone and by both.
			for _, r := range []KeyRef{{ID: ref.ID}, {Label: label}, ref} {
				k2, err := h.FindKey(ctx, r)
				if err != nil {
					t.Fatalf("FindKey(%v): %v", r, err)
				}
				if !k2.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(k.Public()) {
					t.Errorf("FindKey(%v) found another key", r)
				}
			}
		})
	}

	refs, err := h.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	if len(refs) != 3 {
		t.Errorf("Keys() = %v, want 3 keys", refs)
	}

	// What an operator sees with the standard tools.
	out, err := exec.Command("pkcs11-tool", "--module", tok.ModulePath, "--token-label", tok.Label,
		"--login", "--pin", tok.PIN, "--list-objects", "--type", "privkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	if n := strings.Count(string(out), "Access:     sensitive, always sensitive, never extractable, local"); n != 3 {
		t.Errorf("pkcs11-tool shows %d keys as sensitive/never extractable/local, want 3:\n%s", n, out)
	}
	if n := strings.Count(string(out), "Usage:      sign\n"); n != 3 {
		t.Errorf("pkcs11-tool shows %d sign-only keys, want 3:\n%s", n, out)
	}
}

func TestGenerateKeyNeverOverwrites(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	k := generate(t, h, ECP256, "ca-a")
	tests := []struct {
		name, label string
		kt          KeyType
		wantErr     error
		wantText    string
	}{
		{name: "same label same type", label: "ca-a", kt: ECP256, wantErr: ErrKeyExists},
		{name: "same label other type", label: "ca-a", kt: RSA2048, wantErr: ErrKeyExists},
		{name: "empty label", label: "", kt: ECP256, wantText: "label must be"},
		{name: "unknown type", label: "x", kt: KeyType(99), wantText: "unsupported key type"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.GenerateKey(ctx, tc.kt, tc.label)
			if err == nil {
				t.Fatal("GenerateKey succeeded")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error = %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("error = %v, want containing %q", err, tc.wantText)
			}
		})
	}
	refs, err := h.Keys(ctx)
	if err != nil || len(refs) != 1 || !bytes.Equal(refs[0].ID, k.Ref().ID) {
		t.Errorf("after refusals Keys() = %v, %v; want only the first key", refs, err)
	}
	// The original key still signs.
	d := sha256.Sum256([]byte("still here"))
	if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Errorf("original key: %v", err)
	}
}

func TestSignVerify(t *testing.T) {
	h, _ := openToken(t)
	keys := map[KeyType]*Key{
		ECP256:  generate(t, h, ECP256, "ec256"),
		ECP384:  generate(t, h, ECP384, "ec384"),
		RSA2048: generate(t, h, RSA2048, "rsa2048"),
	}
	msg := []byte("the quick brown fox")
	digest := func(hash crypto.Hash) []byte {
		hh := hash.New()
		hh.Write(msg)
		return hh.Sum(nil)
	}
	tests := []struct {
		name    string
		kt      KeyType
		opts    crypto.SignerOpts
		digest  []byte // default digest(opts.HashFunc())
		wantErr string
		saltLen int // for PSS verification
	}{
		{name: "ECDSA P-256 SHA-256", kt: ECP256, opts: crypto.SHA256},
		{name: "ECDSA P-384 SHA-384", kt: ECP384, opts: crypto.SHA384},
		{name: "ECDSA P-256 SHA-512", kt: ECP256, opts: crypto.SHA512},
		{name: "RSA PKCS1v15 SHA-256", kt: RSA2048, opts: crypto.SHA256},
		{name: "RSA PKCS1v15 SHA-384", kt: RSA2048, opts: crypto.SHA384},
		{name: "RSA PKCS1v15 SHA-512", kt: RSA2048, opts: crypto.SHA512},
		{name: "RSA PSS equals hash", kt: RSA2048, opts: &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}, saltLen: 32},
		{name: "RSA PSS auto maps to hash length", kt: RSA2048, opts: &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA384}, saltLen: 48},
		{name: "RSA PSS explicit salt", kt: RSA2048, opts: &rsa.PSSOptions{SaltLength: 20, Hash: crypto.SHA512}, saltLen: 20},
		{name: "short digest", kt: ECP256, opts: crypto.SHA256, digest: []byte{1, 2, 3}, wantErr: "digest is 3 bytes"},
		{name: "no hash", kt: ECP256, opts: crypto.Hash(0), digest: []byte{1}, wantErr: "needs a hash"},
		{name: "RSA SHA-1 refused", kt: RSA2048, opts: crypto.SHA1, wantErr: "unsupported hash"},
		{name: "PSS salt too long", kt: RSA2048, opts: &rsa.PSSOptions{SaltLength: 300, Hash: crypto.SHA256}, wantErr: "too long"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := keys[tc.kt]
			d := tc.digest
			if d == nil {
				d = digest(tc.opts.HashFunc())
			}
			sig, err := k.Sign(rand.Reader, d, tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Sign error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			switch pub := k.Public().(type) {
			case *ecdsa.PublicKey:
				if !ecdsa.VerifyASN1(pub, d, sig) {
					t.Error("ECDSA signature does not verify")
				}
			case *rsa.PublicKey:
				if pss, ok := tc.opts.(*rsa.PSSOptions); ok {
					if err := rsa.VerifyPSS(pub, pss.Hash, d, sig, &rsa.PSSOptions{SaltLength: tc.saltLen}); err != nil {
						t.Errorf("PSS signature does not verify with salt %d: %v", tc.saltLen, err)
					}
				} else if err := rsa.VerifyPKCS1v15(pub, tc.opts.HashFunc(), d, sig); err != nil {
					t.Errorf("PKCS#1 v1.5 signature does not verify: %v", err)
				}
			}
		})
	}
}

func TestCreateCertificate(t *testing.T) {
	h, _ := openToken(t)
	for _, tc := range []struct {
		kt  KeyType
		alg x509.SignatureAlgorithm
	}{
		{ECP256, x509.ECDSAWithSHA256},
		{ECP384, x509.ECDSAWithSHA384},
		{RSA2048, x509.SHA256WithRSA},
		{RSA2048, x509.SHA256WithRSAPSS},
	} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			k := generate(t, h, tc.kt, "ca-"+tc.alg.String())
			tmpl := &x509.Certificate{
				SerialNumber:          big.NewInt(1),
				Subject:               pkix.Name{CommonName: "ironroot test CA"},
				NotBefore:             time.Now().Add(-time.Minute),
				NotAfter:              time.Now().Add(time.Hour),
				IsCA:                  true,
				BasicConstraintsValid: true,
				KeyUsage:              x509.KeyUsageCertSign,
				SignatureAlgorithm:    tc.alg,
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
			if err != nil {
				t.Fatalf("CreateCertificate: %v", err)
			}
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			if err := cert.CheckSignatureFrom(cert); err != nil {
				t.Errorf("self-signed certificate does not verify: %v", err)
			}
		})
	}
}

// importKey writes a software key as PKCS#8 and imports it with
// softhsm2-util --import: CKA_LOCAL false, not always sensitive.
func importKey(t *testing.T, tok *simulator.SoftHSMToken, label, idHex string) *ecdsa.PrivateKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := softHSM.ImportKey(context.Background(), tok, p, label, idHex); err != nil {
		t.Fatal(err)
	}
	return priv
}

func TestImportedKeyRefused(t *testing.T) {
	m := testModule(t)
	tok := takeToken(t)
	priv := importKey(t, tok, "imported", "c0ffee")
	ctx := context.Background()

	strict, err := m.Open(ctx, tok.URI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { strict.Close() })
	_, err = strict.FindKey(ctx, KeyRef{Label: "imported"})
	if !errors.Is(err, ErrKeyNotHardware) || !strings.Contains(err.Error(), "CKA_LOCAL is false") {
		t.Fatalf("FindKey of an imported key: %v, want ErrKeyNotHardware naming CKA_LOCAL", err)
	}

	lax, err := m.Open(ctx, tok.URI, WithAllowImportedKeys())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lax.Close() })
	k, err := lax.FindKey(ctx, KeyRef{ID: []byte{0xc0, 0xff, 0xee}})
	if err != nil {
		t.Fatalf("FindKey WithAllowImportedKeys: %v", err)
	}
	if !priv.PublicKey.Equal(k.Public()) {
		t.Error("found key is not the imported one")
	}
	a, err := k.Attributes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if a.Local || a.AlwaysSensitive || a.NeverExtractable {
		t.Errorf("imported key attributes %+v claim on-token generation", a)
	}
}

func TestFindAndDestroyKey(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	k := generate(t, h, ECP256, "doomed")
	keep := generate(t, h, ECP256, "kept")

	tests := []struct {
		name    string
		ref     KeyRef
		wantErr error
		text    string
	}{
		{name: "missing label", ref: KeyRef{Label: "nope"}, wantErr: ErrKeyNotFound},
		{name: "missing id", ref: KeyRef{ID: []byte{9, 9}}, wantErr: ErrKeyNotFound},
		{name: "label and id disagree", ref: KeyRef{ID: keep.Ref().ID, Label: "doomed"}, wantErr: ErrKeyNotFound},
		{name: "empty ref", ref: KeyRef{}, text: "needs an ID or a label"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.FindKey(ctx, tc.ref)
			if err == nil {
				t.Fatal("FindKey succeeded")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error = %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.text) {
				t.Errorf("error = %v, want %q", err, tc.text)
			}
		})
	}

	if err := h.DestroyKey(ctx, k.Ref()); err != nil {
		t.Fatalf("DestroyKey: %v", err)
	}
	if _, err := h.FindKey(ctx, KeyRef{Label: "doomed"}); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("FindKey after DestroyKey: %v", err)
	}
	if err := h.DestroyKey(ctx, k.Ref()); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("second DestroyKey: %v", err)
	}
	refs, err := h.Keys(ctx)
	if err != nil || len(refs) != 1 || refs[0].Label != "kept" {
		t.Errorf("Keys() after destroy = %v, %v", refs, err)
	}
	// Public objects went too: the label is free again.
	if _, err := h.GenerateKey(ctx, ECP256, "doomed"); err != nil {
		t.Errorf("GenerateKey after destroy: %v", err)
	}
}

func TestConcurrentSign(t *testing.T) {
	h, _ := openToken(t, WithMaxSessions(4))
	k := generate(t, h, ECP256, "busy")
	pub := k.Public().(*ecdsa.PublicKey)
	const goroutines, each = 64, 20
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*each)
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				d := sha256.Sum256([]byte(fmt.Sprintf("%d/%d", g, i)))
				sig, err := k.Sign(nil, d[:], crypto.SHA256)
				if err != nil {
					errs <- err
					continue
				}
				if !ecdsa.VerifyASN1(pub, d[:], sig) {
					errs <- fmt.Errorf("signature %d/%d does not verify", g, i)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := h.Stats(); st.Size != 4 || st.InUse != 0 || st.Recoveries != 0 {
		t.Errorf("Stats() = %+v", st)
	}
}

// TestCloseAllSessionsUnderLoad kills every session of the token behind the
// pool's back while signers run: signing must carry on without a restart
// and without a single failed signature, after exactly one recovery.
func TestCloseAllSessionsUnderLoad(t *testing.T) {
	var logs syncBuffer
	h, tok := openToken(t, WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	k := generate(t, h, ECP256, "survivor")
	pub := k.Public().(*ecdsa.PublicKey)

	const goroutines = 8
	var (
		wg            sync.WaitGroup
		signed        atomic.Int64
		afterClose    atomic.Int64
		closed        atomic.Bool
		stop          = make(chan struct{})
		errs          = make(chan error, 1000)
		closeTriggers = make(chan struct{})
	)
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := sha256.Sum256([]byte("load"))
				sig, err := k.Sign(nil, d[:], crypto.SHA256)
				if err != nil {
					select {
					case errs <- err:
					default:
					}
					continue
				}
				if !ecdsa.VerifyASN1(pub, d[:], sig) {
					errs <- errors.New("bad signature")
				}
				if n := signed.Add(1); n == 200 {
					close(closeTriggers)
				}
				if closed.Load() {
					if afterClose.Add(1) == 500 {
						close(stop)
					}
				}
			}
		}()
	}
	<-closeTriggers
	// SoftHSM frees a session closed by C_CloseAllSessions even while another
	// thread is inside C_Sign on it (double free), so the sessions are killed
	// between two operations: every pool slot is held for the moment of the
	// call, with the signers queued behind it. Every pooled session is dead
	// when they resume.
	for range h.size {
		h.slots <- struct{}{}
	}
	slot := h.state.Load().slot
	err := h.mod.ctx.CloseAllSessions(slot)
	for range h.size {
		<-h.slots
	}
	if err != nil {
		t.Fatalf("C_CloseAllSessions: %v", err)
	}
	closed.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("signing failed around C_CloseAllSessions: %v", err)
	}
	if r := h.Stats().Recoveries; r != 1 {
		t.Errorf("recoveries = %d, want 1", r)
	}
	if !strings.Contains(logs.String(), "CKR_SESSION_HANDLE_INVALID") {
		t.Errorf("recovery not logged with the CKR name:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), tok.PIN) {
		t.Error("log contains the PIN")
	}
	// A new key operation works too (no restart).
	if _, err := h.GenerateKey(context.Background(), ECP256, "after"); err != nil {
		t.Errorf("GenerateKey after recovery: %v", err)
	}
}

// TestRecoverFromLogout: a C_Logout elsewhere in the process logs every
// session out; the next signature logs in again.
func TestRecoverFromLogout(t *testing.T) {
	h, _ := openToken(t)
	k := generate(t, h, RSA2048, "relogin")
	sh, err := h.mod.ctx.OpenSession(h.state.Load().slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.mod.ctx.Logout(sh); err != nil {
		t.Fatalf("C_Logout: %v", err)
	}
	if err := h.mod.ctx.CloseSession(sh); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	sig, err := k.Sign(nil, d[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign after logout: %v", err)
	}
	if err := rsa.VerifyPKCS1v15(k.Public().(*rsa.PublicKey), crypto.SHA256, d[:], sig); err != nil {
		t.Error(err)
	}
	if r := h.Stats().Recoveries; r != 1 {
		t.Errorf("recoveries = %d, want 1", r)
	}
}

// TestRecoveryRateLimited: a second failure within the relogin interval is
// returned, not recovered from.
func TestRecoveryRateLimited(t *testing.T) {
	h, _ := openToken(t, WithReloginInterval(time.Hour), WithMaxSessions(1))
	k := generate(t, h, ECP256, "limited")
	d := sha256.Sum256([]byte("x"))
	slot := h.state.Load().slot
	if err := h.mod.ctx.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatalf("first recovery: %v", err)
	}
	if err := h.mod.ctx.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	_, err := k.Sign(nil, d[:], crypto.SHA256)
	if err == nil || !strings.Contains(err.Error(), "not recovering") || !strings.Contains(err.Error(), "CKR_SESSION_HANDLE_INVALID (0x000000B3)") {
		t.Fatalf("second failure within the interval: %v", err)
	}
	if !errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)) {
		t.Errorf("error does not unwrap to the pkcs11 code: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	m := testModule(t)
	tok := takeToken(t)
	ctx := context.Background()
	notModule := filepath.Join(t.TempDir(), "garbage.so")
	if err := os.WriteFile(notModule, []byte("not an ELF file"), 0o600); err != nil {
		t.Fatal(err)
	}
	badPINFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(badPINFile, []byte("wrong-pin-4711\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		open     func() (*HSM, error)
		wantErr  error
		wantText []string
	}{
		{
			name:     "missing module",
			open:     func() (*HSM, error) { return Open(ctx, "pkcs11:token=x?module-path=/nonexistent/libpkcs11.so") },
			wantErr:  ErrModuleNotFound,
			wantText: []string{"/nonexistent/libpkcs11.so"},
		},
		{
			name:     "not a PKCS#11 module",
			open:     func() (*HSM, error) { return Open(ctx, "pkcs11:token=x?module-path="+notModule) },
			wantErr:  ErrNotPKCS11Module,
			wantText: []string{notModule},
		},
		{
			name:     "no module-path",
			open:     func() (*HSM, error) { return Open(ctx, "pkcs11:token=x") },
			wantText: []string{"no module-path"},
		},
		{
			name:     "module already initialised in this process",
			open:     func() (*HSM, error) { return Open(ctx, tok.URI) },
			wantErr:  ErrModuleInUse,
			wantText: []string{"CKR_CRYPTOKI_ALREADY_INITIALIZED"},
		},
		{
			name:     "bad URI",
			open:     func() (*HSM, error) { return m.Open(ctx, "pkcs11:token=x;bogus=1") },
			wantText: []string{`unknown attribute "bogus"`},
		},
		{
			name:     "missing token",
			open:     func() (*HSM, error) { return m.Open(ctx, "pkcs11:token=no-such-token?pin-value=1234") },
			wantErr:  ErrTokenNotFound,
			wantText: []string{`"no-such-token"`},
		},
		{
			name:     "slot-id only",
			open:     func() (*HSM, error) { return m.Open(ctx, "pkcs11:slot-id=0") },
			wantText: []string{"token= (label) or serial="},
		},
		{
			name:     "other module-path",
			open:     func() (*HSM, error) { return m.Open(ctx, "pkcs11:token=a?module-path=/usr/lib/other.so") },
			wantText: []string{"not the loaded module"},
		},
		{
			name:     "wrong PIN from option",
			open:     func() (*HSM, error) { return m.Open(ctx, tok.URI, WithPIN("wrong-pin-4711")) },
			wantErr:  ErrPIN,
			wantText: []string{"CKR_PIN_INCORRECT (0x000000A0)", tok.Label},
		},
		{
			name: "wrong PIN from file",
			open: func() (*HSM, error) {
				return m.Open(ctx, "pkcs11:token="+tok.Label+"?pin-source=file://"+badPINFile)
			},
			wantErr:  ErrPIN,
			wantText: []string{"C_Login: CKR_PIN_INCORRECT"},
		},
		{
			name:     "missing PIN file",
			open:     func() (*HSM, error) { return m.Open(ctx, "pkcs11:token="+tok.Label+"?pin-source=/nonexistent/pin") },
			wantText: []string{"reading PIN file"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := tc.open()
			if err == nil {
				h.Close()
				t.Fatal("open succeeded")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error = %v, want %v", err, tc.wantErr)
			}
			for _, s := range tc.wantText {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error = %v, want containing %q", err, s)
				}
			}
			for _, secret := range []string{"wrong-pin-4711", tok.PIN} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error reveals a PIN: %v", err)
				}
			}
		})
	}
	// The right PIN still works: the wrong ones did not lock the token.
	h, err := m.Open(ctx, tok.URI)
	if err != nil {
		t.Fatalf("open with the right PIN after wrong ones: %v", err)
	}
	h.Close()
}

// TestSessionWaitBounded: with every session lent out, a signer waits only
// as long as its context allows.
func TestSessionWaitBounded(t *testing.T) {
	h, _ := openToken(t, WithMaxSessions(1))
	k := generate(t, h, ECP256, "waiter")
	s, err := h.acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	d := sha256.Sum256([]byte("x"))
	_, err = k.SignContext(ctx, d[:], crypto.SHA256)
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "waiting for one of 1 PKCS#11 sessions") {
		t.Errorf("SignContext with all sessions busy: %v", err)
	}
	h.release(s, false)
	if _, err := k.SignContext(context.Background(), d[:], crypto.SHA256); err != nil {
		t.Errorf("SignContext after release: %v", err)
	}
}

func TestClosedHSM(t *testing.T) {
	m := testModule(t)
	tok := takeToken(t)
	h, err := m.Open(context.Background(), tok.URI)
	if err != nil {
		t.Fatal(err)
	}
	k := generate(t, h, ECP256, "closing")
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := k.Sign(nil, d[:], crypto.SHA256); !errors.Is(err, ErrClosed) {
		t.Errorf("Sign after Close: %v", err)
	}
	if _, err := h.Keys(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Keys after Close: %v", err)
	}
}

func TestParseECPublicKey(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := priv.PublicKey.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	wrapped, err := asn1.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name          string
		params, point []byte
		wantErr       string
	}{
		{name: "DER OCTET STRING", params: []byte(oidP384), point: wrapped},
		{name: "raw point", params: []byte(oidP384), point: raw},
		{name: "wrong curve", params: []byte(oidP256), point: raw, wantErr: "CKA_EC_POINT has 97 bytes"},
		{name: "unknown curve", params: []byte{6, 1, 1}, point: raw, wantErr: "unsupported EC curve"},
		{name: "truncated", params: []byte(oidP384), point: raw[:50], wantErr: "CKA_EC_POINT has 50 bytes"},
		{name: "not on curve", params: []byte(oidP384), point: append([]byte{4}, make([]byte, 96)...), wantErr: "parsing CKA_EC_POINT"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := parseECPublicKey(tc.params, tc.point)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !pub.Equal(&priv.PublicKey) {
				t.Fatalf("parseECPublicKey = %v, %v", pub, err)
			}
		})
	}
}

func TestECDSADER(t *testing.T) {
	rnd := func(n int) []byte {
		b := make([]byte, n)
		rand.Read(b)
		return b
	}
	high := func(n int) []byte { b := rnd(n); b[0] |= 0x80; return b }
	lead := func(n int) []byte { b := rnd(n); b[0], b[1] = 0, 0x7f; return b }
	tests := []struct {
		name string
		r, s []byte
	}{
		{"P-256 random", rnd(32), rnd(32)},
		{"P-256 high bits", high(32), high(32)},
		{"P-256 leading zeros", lead(32), lead(32)},
		{"P-256 small r", append(make([]byte, 31), 5), high(32)},
		{"P-384 high bits", high(48), high(48)},
		{"P-521 long form", high(66), high(66)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			der, err := ecdsaDER(append(append([]byte{}, tc.r...), tc.s...))
			if err != nil {
				t.Fatal(err)
			}
			want, err := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(tc.r), new(big.Int).SetBytes(tc.s)})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(der, want) {
				t.Errorf("ecdsaDER = %x\nwant       %x", der, want)
			}
		})
	}
	for _, bad := range [][]byte{nil, {1, 2, 3}, make([]byte, 64), make([]byte, 134)} {
		if _, err := ecdsaDER(bad); err == nil {
			t.Errorf("ecdsaDER(%d bytes) accepted", len(bad))
		}
	}
}

func TestErrorFormat(t *testing.T) {
	tests := []struct {
		err   error
		want  string
		class errClass
	}{
		{p11err("C_Sign", pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)), "C_Sign: CKR_SESSION_HANDLE_INVALID (0x000000B3)", classSession},
		{p11err("C_Login", pkcs11.Error(pkcs11.CKR_PIN_LOCKED)), "C_Login: CKR_PIN_LOCKED (0x000000A4)", classPIN},
		{p11err("C_Sign", pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)), "C_Sign: CKR_GENERAL_ERROR (0x00000005)", classToken},
		{p11err("C_Sign", pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)), "C_Sign: CKR_USER_NOT_LOGGED_IN (0x00000101)", classLogin},
		{p11err("C_Sign", pkcs11.Error(pkcs11.CKR_DATA_LEN_RANGE)), "C_Sign: CKR_DATA_LEN_RANGE (0x00000021)", classNone},
		{p11err("C_Sign", pkcs11.Error(0x80000001)), "C_Sign: CKR_VENDOR_DEFINED (0x80000001)", classNone},
	}
	for _, tc := range tests {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
		wrapped := fmt.Errorf("signing: %w", tc.err)
		if got := classify(wrapped); got != tc.class {
			t.Errorf("classify(%v) = %v, want %v", tc.err, got, tc.class)
		}
		if errors.Is(wrapped, ErrPIN) != (tc.class == classPIN) {
			t.Errorf("errors.Is(%v, ErrPIN) wrong", tc.err)
		}
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent log writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestKeyReplacedUnderneath: when a key's object disappears, the signer
// finds it again by ID and label, and refuses a different key put there.
func TestKeyReplacedUnderneath(t *testing.T) {
	ctx := context.Background()
	h, _ := openToken(t, WithReloginInterval(0))
	d := sha256.Sum256([]byte("x"))

	gone := generate(t, h, ECP256, "gone")
	if err := h.DestroyKey(ctx, gone.Ref()); err != nil {
		t.Fatal(err)
	}
	if _, err := gone.Sign(nil, d[:], crypto.SHA256); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("Sign with a destroyed key: %v, want ErrKeyNotFound", err)
	}

	k := generate(t, h, ECP256, "swapped")
	ref := k.Ref()
	if err := h.DestroyKey(ctx, ref); err != nil {
		t.Fatal(err)
	}
	// Another key under the same CKA_ID and CKA_LABEL.
	mech, pubT, privT, err := keyTemplates(ECP256)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label),
	} {
		pubT, privT = append(pubT, a), append(privT, a)
	}
	if err := h.do(ctx, func(s *session) error {
		_, _, err := h.mod.ctx.GenerateKeyPair(s.h, mech, pubT, privT)
		return p11err("C_GenerateKeyPair", err)
	}); err != nil {
		t.Fatal(err)
	}
	_, err = k.Sign(nil, d[:], crypto.SHA256)
	if err == nil || !strings.Contains(err.Error(), "different key") {
		t.Errorf("Sign after the key was swapped: %v, want a refusal", err)
	}
}

func TestModuleInfo(t *testing.T) {
	in, err := testModule(t).Info()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(in.Manufacturer, "SoftHSM") || in.Version == "" {
		t.Errorf("Info() = %+v", in)
	}
}

func TestParseKeyType(t *testing.T) {
	tests := []struct {
		in   string
		want KeyType
		err  bool
	}{
		{"EC-P256", ECP256, false}, {"p384", ECP384, false}, {"ec_p256", ECP256, false},
		{"RSA-2048", RSA2048, false}, {"rsa3072", RSA3072, false}, {"RSA_4096", RSA4096, false},
		{"ed25519", 0, true}, {"", 0, true}, {"rsa1024", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseKeyType(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseKeyType(%q) = %v, %v", tc.in, got, err)
		}
		if !tc.err {
			if back, err := ParseKeyType(got.String()); err != nil || back != got {
				t.Errorf("ParseKeyType(%q.String()) = %v, %v", got, back, err)
			}
		}
	}
	if s := KeyType(42).String(); s != "KeyType(42)" {
		t.Errorf("unknown KeyType String() = %q", s)
	}
}

func TestParseRSAPublicKey(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	n := priv.N.Bytes()
	tests := []struct {
		name    string
		mod, e  []byte
		wantErr string
	}{
		{name: "ok", mod: n, e: []byte{1, 0, 1}},
		{name: "short modulus", mod: n[:128], e: []byte{1, 0, 1}, wantErr: "modulus of 1024 bits"},
		{name: "even exponent", mod: n, e: []byte{4}, wantErr: "exponent"},
		{name: "exponent 1", mod: n, e: []byte{1}, wantErr: "exponent"},
		{name: "huge exponent", mod: n, e: bytes.Repeat([]byte{0xff}, 9), wantErr: "exponent"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := parseRSAPublicKey(tc.mod, tc.e)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !pub.Equal(&priv.PublicKey) {
				t.Fatalf("parseRSAPublicKey = %v, %v", pub, err)
			}
		})
	}
}

func TestModuleCloseRefusedWhileOpen(t *testing.T) {
	m := testModule(t)
	h, tok := openToken(t)
	if m.Path() != softHSM.ModulePath() || h.Module() != m {
		t.Errorf("Path() = %q, Module() = %p", m.Path(), h.Module())
	}
	if err := m.Close(); err == nil || !strings.Contains(err.Error(), "still open") {
		t.Fatalf("Module.Close with an open token: %v", err)
	}
	u, err := ParseURI(h.URI())
	if err != nil || u.Token != tok.Label || u.ModulePath != m.Path() || u.HasPINValue() {
		t.Errorf("HSM.URI() = %q, %v", h.URI(), err)
	}
}

// TestTokenDeleted: the token vanishes under a live signer (SoftHSM: sign
// gives CKR_OBJECT_HANDLE_INVALID, C_GetTokenInfo CKR_GENERAL_ERROR). The
// signer recovers as far as it can and reports the token as gone.
func TestTokenDeleted(t *testing.T) {
	ctx := context.Background()
	m := testModule(t)
	tok := simtest.SoftHSMToken(t, softHSM) // not recycled: it is deleted
	h, err := m.Open(ctx, tok.URI, WithReloginInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	k := generate(t, h, ECP256, "orphan")
	if err := softHSM.DeleteToken(ctx, tok.Label); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	_, err = k.Sign(nil, d[:], crypto.SHA256)
	if err == nil {
		t.Fatal("Sign on a deleted token succeeded")
	}
	if !errors.Is(err, ErrTokenNotFound) && !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("Sign on a deleted token: %v, want the token or key reported missing", err)
	}
	t.Logf("error: %v", err)
}

// helperEnv makes the test binary run TestOpenOwnsModuleHelper for real: a
// module is initialised once per process, so Open's ownership of the module
// is tested in a child process that has not loaded it.
const helperEnv = "IRONROOT_HSM_OPEN_HELPER"

func TestOpenOwnsModule(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestOpenOwnsModuleHelper$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper process: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestOpenOwnsModuleHelper") {
		t.Fatalf("helper did not run:\n%s", out)
	}
}

// TestOpenOwnsModuleHelper does nothing unless run by TestOpenOwnsModule.
func TestOpenOwnsModuleHelper(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		return
	}
	ctx := context.Background()
	tok1, err := softHSM.TakeToken()
	if err != nil {
		t.Fatal(err)
	}
	tok2, err := softHSM.TakeToken()
	if err != nil {
		t.Fatal(err)
	}
	h1, err := Open(ctx, tok1.URI)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if _, err := Open(ctx, tok2.URI); !errors.Is(err, ErrModuleInUse) {
		t.Errorf("second Open of the module: %v, want ErrModuleInUse", err)
	}
	h2, err := h1.Module().Open(ctx, tok2.URI)
	if err != nil {
		t.Fatalf("Module().Open: %v", err)
	}
	k := generate(t, h2, ECP256, "shared")
	if err := h1.Close(); err != nil {
		t.Fatalf("closing the owner: %v", err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatalf("token opened through the owner's module stopped working: %v", err)
	}
	if err := h2.Close(); err != nil {
		t.Fatalf("closing the last token: %v", err)
	}
	// The module was finalised with the last token: it loads again.
	h3, err := Open(ctx, tok2.URI)
	if err != nil {
		t.Fatalf("Open after the module was finalised: %v", err)
	}
	if _, err := h3.FindKey(ctx, KeyRef{Label: "shared"}); err != nil {
		t.Errorf("key after reload: %v", err)
	}
	if err := h3.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRecoveryNeverRetriesPIN: if the PIN stops working (changed
// elsewhere), the recovery's login fails once and is never tried again.
func TestRecoveryNeverRetriesPIN(t *testing.T) {
	ctx := context.Background()
	m := testModule(t)
	tok := simtest.SoftHSMToken(t, softHSM) // not recycled: its PIN changes
	h, err := m.Open(ctx, tok.URI, WithReloginInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	k := generate(t, h, ECP256, "pinned")
	if err := h.do(ctx, func(s *session) error {
		return p11err("C_SetPIN", h.mod.ctx.SetPIN(s.h, tok.PIN, "changed-elsewhere-77"))
	}); err != nil {
		t.Fatal(err)
	}
	// Kill the sessions (and with them the login) between operations.
	for range h.size {
		h.slots <- struct{}{}
	}
	err = h.mod.ctx.CloseAllSessions(h.state.Load().slot)
	for range h.size {
		<-h.slots
	}
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	_, err = k.Sign(nil, d[:], crypto.SHA256)
	if !errors.Is(err, ErrPIN) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("Sign after the PIN changed: %v, want ErrPIN", err)
	}
	_, err = k.Sign(nil, d[:], crypto.SHA256)
	if !errors.Is(err, ErrPIN) || !strings.Contains(err.Error(), "refused the PIN earlier") {
		t.Errorf("second Sign: %v, want the earlier PIN refusal without a new login", err)
	}
	for _, pin := range []string{tok.PIN, "changed-elsewhere-77"} {
		if strings.Contains(err.Error(), pin) {
			t.Errorf("error reveals a PIN: %v", err)
		}
	}
	if r := h.Stats().Recoveries; r != 1 {
		t.Errorf("recoveries = %d, want 1", r)
	}
}

func TestGenerateRSALarge(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	for _, tc := range []struct {
		kt   KeyType
		bits int
	}{{RSA3072, 3072}, {RSA4096, 4096}} {
		t.Run(tc.kt.String(), func(t *testing.T) {
			k := generate(t, h, tc.kt, tc.kt.String())
			pub := k.Public().(*rsa.PublicKey)
			if pub.N.BitLen() != tc.bits {
				t.Errorf("modulus %d bits, want %d", pub.N.BitLen(), tc.bits)
			}
			a, err := k.Attributes(ctx)
			if err != nil || a.HardwareBound() != nil {
				t.Errorf("attributes %+v, %v", a, err)
			}
			d := sha512.Sum512([]byte("large"))
			opts := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA512}
			sig, err := k.Sign(nil, d[:], opts)
			if err != nil {
				t.Fatal(err)
			}
			if err := rsa.VerifyPSS(pub, crypto.SHA512, d[:], sig, opts); err != nil {
				t.Errorf("PSS signature does not verify: %v", err)
			}
		})
	}
}
