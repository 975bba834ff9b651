package server_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ironroot/ironroot/hsm"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/store"
)

func TestRestartKeepsState(t *testing.T) {
	e := newEnv(t)
	a := e.newAgent(store.Selector{Type: "tpm", Value: manufacturer})
	e.createEntry("-spiffeID", "spiffe://example.org/web", "-parentID", a.id.String(), "-selector", "unix:uid:1000")
	e.createEntry("-node", "-spiffeID", "spiffe://example.org/fleet", "-selector", "tpm:"+manufacturer)
	bundleBefore := e.mustCLI("bundle", "show")
	jwtBefore := e.srv.CA().Bundle().JWTAuthorities
	entriesBefore := e.mustCLI("entry", "show", "-output", "json")
	nodeBefore, err := e.srv.Store().GetNode(context.Background(), a.id.String())
	if err != nil {
		t.Fatal(err)
	}

	if err := e.restart(); err != nil {
		t.Fatalf("restarting on the same data directory and token: %v", err)
	}

	if got := e.mustCLI("bundle", "show"); got != bundleBefore {
		t.Errorf("bundle changed across restart:\n%s\nwant\n%s", got, bundleBefore)
	}
	jwtAfter := e.srv.CA().Bundle().JWTAuthorities
	if !slices.EqualFunc(jwtBefore, jwtAfter, func(x, y ca.JWTKey) bool {
		return x.KeyID == y.KeyID && x.NotAfter.Equal(y.NotAfter)
	}) {
		t.Errorf("JWT authorities changed across restart")
	}
	if got := e.mustCLI("entry", "show", "-output", "json"); got != entriesBefore {
		t.Errorf("entries changed across restart:\n%s\nwant\n%s", got, entriesBefore)
	}
	nodeAfter, err := e.srv.Store().GetNode(context.Background(), a.id.String())
	if err != nil {
		t.Fatalf("node lost across restart: %v", err)
	}
	if nodeAfter.CertSerial != nodeBefore.CertSerial || !slices.Equal(nodeAfter.Selectors, nodeBefore.Selectors) {
		t.Errorf("node record changed across restart: %+v, want %+v", nodeAfter, nodeBefore)
	}
	// The agent's SVID from before the restart is still accepted.
	st := e.openSync(e.dial(a.svid))
	if m := st.next(t); !m.Full || len(m.Upserted) != 2 {
		t.Errorf("Sync after restart: full=%t with %d entries, want the 2 authorized", m.Full, len(m.Upserted))
	}
}

func TestStartRefusesDestroyedKey(t *testing.T) {
	e := newEnv(t)
	auths := e.srv.CA().X509Authorities()
	if len(auths) == 0 {
		t.Fatal("no X.509 authority")
	}
	ref := auths[0].Key.Ref()
	e.shutdown()

	h, err := hsm.Open(context.Background(), e.token.URI)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.DestroyKey(context.Background(), hsm.KeyRef{ID: ref.ID, Label: ref.Label}); err != nil {
		h.Close()
		t.Fatalf("destroying the CA key: %v", err)
	}
	h.Close()

	err = e.start()
	if err == nil {
		t.Fatal("server started although its CA key is gone from the token")
	}
	t.Logf("start-up refused: %v", err)
	msg := err.Error()
	if !strings.Contains(msg, "could not be found on the HSM") || !strings.Contains(msg, ref.Label) {
		t.Errorf("start-up error %q does not say the key %q is missing from the HSM", msg, ref.Label)
	}
	if _, serr := os.Stat(e.cfg.SocketPath); serr == nil {
		t.Errorf("a refused start left the admin socket %s behind", e.cfg.SocketPath)
	}
}

// hsmKeyAttributes is what the CA's keys on the token expose.
type hsmKeyAttributes interface {
	Attributes(ctx context.Context) (hsm.KeyAttributes, error)
}

func TestNoPrivateKeyMaterialOutsideTheHSM(t *testing.T) {
	e := newEnv(t)
	a := e.newAgent()
	e.createEntry("-spiffeID", "spiffe://example.org/web", "-parentID", a.id.String(), "-selector", "unix:uid:1000")
	// Issue SVIDs, so that every code path that touches keys has run.
	client := e.dial(a.svid)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{Params: []*agentv1.X509SVIDParams{{EntryId: mustEntryID(t, e), Csr: newCSR(t)}}})
	if err != nil || resp.Results[0].Svid == nil {
		t.Fatalf("BatchNewX509SVID: %v %v", err, resp)
	}

	var keys []hsmKeyAttributes
	for _, au := range e.srv.CA().X509Authorities() {
		keys = append(keys, au.Key.(hsmKeyAttributes))
	}
	for _, au := range e.srv.CA().JWTAuthorities() {
		keys = append(keys, au.Key.(hsmKeyAttributes))
	}
	if len(keys) < 2 {
		t.Fatalf("%d CA keys, want the X.509 and the JWT key", len(keys))
	}
	for i, k := range keys {
		attrs, err := k.Attributes(ctx)
		if err != nil {
			t.Fatalf("reading key %d attributes: %v", i, err)
		}
		if err := attrs.HardwareBound(); err != nil || attrs.Extractable || !attrs.Sensitive || !attrs.NeverExtractable {
			t.Errorf("CA key %d attributes %+v: %v; want sensitive, never extractable, generated on the token", i, attrs, err)
		}
	}

	e.shutdown()
	if fi, err := os.Stat(e.cfg.DataDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("data directory mode: %v %v, want 0700", fi.Mode().Perm(), err)
	}
	var scanned int
	err = filepath.WalkDir(e.cfg.DataDir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		scanned++
		if bytes.Contains(data, []byte("PRIVATE KEY")) {
			t.Errorf("%s contains a PEM private key", path)
		}
		if off, kind := findPrivateKeyDER(data); off >= 0 {
			t.Errorf("%s holds a DER %s private key at offset %d", path, kind, off)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if scanned == 0 {
		t.Fatal("data directory is empty: nothing was scanned")
	}
}

func mustEntryID(t *testing.T, e *env) string {
	t.Helper()
	en, _, err := e.srv.Store().ListEntries(context.Background(), store.ListEntriesRequest{SPIFFEID: "spiffe://example.org/web"})
	if err != nil || len(en) != 1 {
		t.Fatalf("finding the web entry: %v (%d)", err, len(en))
	}
	return en[0].ID
}

// findPrivateKeyDER looks for a PKCS#8, SEC 1 EC or PKCS#1 RSA private key
// structure starting anywhere in data.
func findPrivateKeyDER(data []byte) (int, string) {
	for i := range data {
		if data[i] != 0x30 {
			continue
		}
		rest := data[i:]
		if _, err := x509.ParsePKCS8PrivateKey(rest); err == nil {
			return i, "PKCS#8"
		}
		if _, err := x509.ParseECPrivateKey(rest); err == nil {
			return i, "EC"
		}
		// PKCS#1 refuses trailing data: try the length its header gives.
		if n := derLength(rest); n > 0 && n <= len(rest) {
			if _, err := x509.ParsePKCS1PrivateKey(rest[:n]); err == nil {
				return i, "PKCS#1"
			}
		}
	}
	return -1, ""
}

// derLength is the total length of the DER SEQUENCE at the start of b, or 0.
func derLength(b []byte) int {
	if len(b) < 2 {
		return 0
	}
	l := int(b[1])
	if l < 0x80 {
		return 2 + l
	}
	n := l & 0x7f
	if n == 0 || n > 3 || len(b) < 2+n {
		return 0
	}
	l = 0
	for _, c := range b[2 : 2+n] {
		l = l<<8 | int(c)
	}
	return 2 + n + l
}

// TestFindPrivateKeyDER checks the scanner itself finds keys buried in
// other bytes, so that the test above can fail.
func TestFindPrivateKeyDER(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	sec1, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	noise := bytes.Repeat([]byte{0x30, 0x82, 0x01, 0x00, 0x02}, 200)
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"PKCS#8 in noise", slices.Concat(noise, pkcs8, noise), "PKCS#8"},
		{"SEC 1 in noise", slices.Concat(noise, sec1, noise), "EC"},
		{"noise only", noise, ""},
		{"certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}), ""},
	}
	for _, tc := range tests {
		if off, kind := findPrivateKeyDER(tc.data); kind != tc.want || (tc.want != "" && off != len(noise)) {
			t.Errorf("%s: found %q at %d, want %q at %d", tc.name, kind, off, tc.want, len(noise))
		}
	}
}
