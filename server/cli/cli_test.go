package cli_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/server"
	"github.com/ironroot/ironroot/server/cli"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var softHSM *simulator.SoftHSM

// One PKCS#11 module per process: the tests run one server at a time.
func TestMain(m *testing.M) { os.Exit(simtest.RunWithSoftHSM(m, &softHSM, 8)) }

var td = spiffeid.RequireTrustDomainFromString("example.org")

type env struct {
	t    *testing.T
	srv  *server.Server
	sock string
	dir  string
	pin  string
}

// newEnv runs a server on a fresh SoftHSM token, SQLite store and admin
// socket until the test ends.
func newEnv(t *testing.T) *env {
	t.Helper()
	tok := simtest.SoftHSMToken(t, softHSM)
	dir := t.TempDir()
	// Unix socket paths are limited to 108 bytes.
	sockDir, err := os.MkdirTemp("", "irc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := &config.Config{
		TrustDomain:        td,
		BindAddress:        "127.0.0.1",
		SocketPath:         filepath.Join(sockDir, "private", "api.sock"),
		DataDir:            filepath.Join(dir, "data"),
		CATTL:              24 * time.Hour,
		DefaultX509SVIDTTL: time.Hour,
		DefaultJWTSVIDTTL:  5 * time.Minute,
		AgentTTL:           time.Hour,
		HSM:                tok.URI,
		NodeAttestation:    config.TPMPolicy{EKRootDir: ekRootDir(t, dir), PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}},
	}
	s, err := server.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("starting server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server Run: %v", err)
		}
		s.Close()
	})
	if fi, err := os.Stat(filepath.Dir(cfg.SocketPath)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("admin socket directory: %v, mode %v; want 0700", err, fi.Mode().Perm())
	}
	return &env{t: t, srv: s, sock: cfg.SocketPath, dir: dir, pin: tok.PIN}
}

func ekRootDir(t *testing.T, dir string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test EK root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "ek-roots")
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "root.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return root
}

// run runs `ironroot-server args... -socketPath <sock>` with buffers.
func (e *env) run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	c := &cli.CLI{Stdout: &out, Stderr: &errb}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code = c.Main(ctx, append(append([]string(nil), args...), "-socketPath", e.sock))
	return code, out.String(), errb.String()
}

func (e *env) mustRun(args ...string) string {
	e.t.Helper()
	code, out, errOut := e.run(args...)
	if code != 0 {
		e.t.Fatalf("ironroot-server %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

type jsonEntry struct {
	ID        string `json:"id"`
	SPIFFEID  string `json:"spiffe_id"`
	ParentID  string `json:"parent_id"`
	Selectors []struct {
		Type  string `json:"type"`
		Value string `json:"value"`
	} `json:"selectors"`
	X509SVIDTTL int      `json:"x509_svid_ttl"`
	DNSNames    []string `json:"dns_names"`
	Hint        string   `json:"hint"`
	Revision    string   `json:"revision_number"`
}

func parseEntries(t *testing.T, out string) []jsonEntry {
	t.Helper()
	var resp struct {
		Entries []jsonEntry `json:"entries"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("parsing -output json %q: %v", out, err)
	}
	return resp.Entries
}

func (e *env) writeFile(name, content string) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return p
}

const agentA = "spiffe://example.org/ironroot/agent/tpm/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

func TestEntryCommands(t *testing.T) {
	e := newEnv(t)

	// create with flags, as people read it.
	out := e.mustRun("entry", "create", "-spiffeID", "spiffe://example.org/web", "-parentID", agentA,
		"-selector", "unix:uid:1000", "-selector", "unix:gid:1000", "-dns", "web.example.org", "-x509SVIDTTL", "3600", "-hint", "frontend")
	for _, want := range []string{"Found 1 entry", "Entry ID         : ", "SPIFFE ID        : spiffe://example.org/web",
		"Parent ID        : " + agentA, "Selector         : unix:gid:1000", "Selector         : unix:uid:1000",
		"X509-SVID TTL    : 1h0m0s", "JWT-SVID TTL     : default", "DNS name         : web.example.org", "Hint             : frontend"} {
		if !strings.Contains(out, want) {
			t.Errorf("entry create output lacks %q:\n%s", want, out)
		}
	}

	// -node: parented to the server ID; -output json for scripts.
	alias := parseEntries(t, e.mustRun("entry", "create", "-node", "-spiffeID", "spiffe://example.org/fleet/swtpm",
		"-selector", "tpm:manufacturer:id:53574D20", "-output", "json"))
	if len(alias) != 1 || alias[0].ParentID != "spiffe://example.org/ironroot/server" || alias[0].ID == "" {
		t.Fatalf("node alias = %+v, want one entry parented to the server ID", alias)
	}

	// -data: a batch in the proto JSON form.
	data := e.writeFile("entries.json", `{"entries": [
		{"spiffe_id": "spiffe://example.org/db", "parent_id": "spiffe://example.org/fleet/swtpm", "selectors": [{"type": "unix", "value": "uid:999"}]},
		{"spiffeId": "spiffe://example.org/cache", "parentId": "spiffe://example.org/fleet/swtpm", "selectors": [{"type": "unix", "value": "uid:998"}], "jwtSvidTtl": 60},
		{"spiffe_id": "spiffe://example.org/batch", "parent_id": "`+agentA+`", "selectors": [{"type": "unix", "value": "user:batch"}], "dns_names": ["batch.example.org"]}
	]}`)
	batch := parseEntries(t, e.mustRun("entry", "create", "-data", data, "-output", "json"))
	if len(batch) != 3 || batch[0].SPIFFEID != "spiffe://example.org/db" || batch[2].DNSNames[0] != "batch.example.org" {
		t.Fatalf("-data created %+v", batch)
	}

	// show, with each filter.
	shows := []struct {
		name string
		args []string
		want []string
	}{
		{"all", nil, []string{"spiffe://example.org/web", "spiffe://example.org/fleet/swtpm", "spiffe://example.org/db", "spiffe://example.org/cache", "spiffe://example.org/batch"}},
		{"by SPIFFE ID", []string{"-spiffeID", "spiffe://example.org/db"}, []string{"spiffe://example.org/db"}},
		{"by parent ID", []string{"-parentID", "spiffe://example.org/fleet/swtpm"}, []string{"spiffe://example.org/db", "spiffe://example.org/cache"}},
		{"by exact selectors", []string{"-selector", "unix:gid:1000", "-selector", "unix:uid:1000"}, []string{"spiffe://example.org/web"}},
		{"by selectors, not a superset", []string{"-selector", "unix:uid:1000"}, nil},
		{"by entry ID", []string{"-entryID", alias[0].ID}, []string{"spiffe://example.org/fleet/swtpm"}},
	}
	for _, s := range shows {
		got := parseEntries(t, e.mustRun(append([]string{"entry", "show", "-output", "json"}, s.args...)...))
		var ids []string
		for _, en := range got {
			ids = append(ids, en.SPIFFEID)
		}
		if len(ids) != len(s.want) {
			t.Errorf("entry show %s: %v, want %v", s.name, ids, s.want)
			continue
		}
		for _, w := range s.want {
			if !strings.Contains(strings.Join(ids, " "), w) {
				t.Errorf("entry show %s: %v lacks %s", s.name, ids, w)
			}
		}
	}
	if out := e.mustRun("entry", "show", "-spiffeID", "spiffe://example.org/nothing"); !strings.Contains(out, "Found 0 entries") {
		t.Errorf("empty show says %q", out)
	}

	// update replaces fields and bumps the revision.
	web := parseEntries(t, e.mustRun("entry", "show", "-spiffeID", "spiffe://example.org/web", "-output", "json"))[0]
	up := parseEntries(t, e.mustRun("entry", "update", "-entryID", web.ID, "-spiffeID", "spiffe://example.org/web",
		"-parentID", agentA, "-selector", "unix:uid:1001", "-output", "json"))
	if len(up) != 1 || up[0].Revision != "1" || len(up[0].Selectors) != 1 || up[0].Selectors[0].Value != "uid:1001" || up[0].Hint != "" {
		t.Errorf("updated entry = %+v, want revision 1 with only unix:uid:1001", up)
	}

	// delete, then it is gone.
	if out := e.mustRun("entry", "delete", "-entryID", web.ID); !strings.Contains(out, "Deleted entry with ID: "+web.ID) {
		t.Errorf("entry delete said %q", out)
	}
	if code, _, errOut := e.run("entry", "show", "-entryID", web.ID); code != 1 || !strings.Contains(errOut, "NotFound") {
		t.Errorf("show of a deleted entry: exit %d %q, want 1 and NotFound", code, errOut)
	}
	countBefore := len(parseEntries(t, e.mustRun("entry", "show", "-output", "json")))

	// Refusals name what was wrong and store nothing.
	oversize := e.writeFile("oversize.json", bigBatch(10001))
	badInBatch := e.writeFile("bad.json", `{"entries": [
		{"spiffe_id": "spiffe://example.org/ok", "parent_id": "`+agentA+`", "selectors": [{"type": "unix", "value": "uid:1"}]},
		{"spiffe_id": "spiffe://example.org/x", "parent_id": "`+agentA+`", "selectors": [{"type": "", "value": "uid:1"}]}
	]}`)
	refusals := []struct {
		name     string
		args     []string
		wantCode int
		want     []string
	}{
		{"duplicate", []string{"entry", "create", "-spiffeID", "spiffe://example.org/db", "-parentID", "spiffe://example.org/fleet/swtpm", "-selector", "unix:uid:999"}, 1, []string{"AlreadyExists"}},
		{"bad SPIFFE ID", []string{"entry", "create", "-spiffeID", "spiffe://example.org/a//b", "-parentID", agentA, "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "spiffe_id", "spiffe://example.org/a//b"}},
		{"not a SPIFFE ID", []string{"entry", "create", "-spiffeID", "https://example.org/x", "-parentID", agentA, "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "spiffe_id"}},
		{"bad parent ID", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", "spiffe://EXAMPLE.org/x", "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "parent_id"}},
		{"foreign trust domain", []string{"entry", "create", "-spiffeID", "spiffe://other.org/x", "-parentID", agentA, "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "trust domain example.org"}},
		{"selector without value", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix"}, 2, []string{"-selector", `"unix"`, "type:value"}},
		{"selector with empty value", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix:"}, 2, []string{"-selector", "empty value"}},
		{"reserved server ID", []string{"entry", "create", "-spiffeID", "spiffe://example.org/ironroot/server", "-parentID", agentA, "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "reserved"}},
		{"reserved agent ID", []string{"entry", "create", "-spiffeID", agentA, "-parentID", "spiffe://example.org/x", "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "reserved"}},
		{"own parent", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", "spiffe://example.org/x", "-selector", "unix:uid:1"}, 1, []string{"InvalidArgument", "spiffe://example.org/x"}},
		{"bad DNS name", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix:uid:1", "-dns", "bad name"}, 1, []string{"InvalidArgument", "DNS name"}},
		{"no parent", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-selector", "unix:uid:1"}, 2, []string{"-parentID"}},
		{"node with parent", []string{"entry", "create", "-node", "-parentID", agentA, "-spiffeID", "spiffe://example.org/x", "-selector", "tpm:x:y"}, 2, []string{"-node and -parentID"}},
		{"no selector", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA}, 2, []string{"-selector"}},
		{"negative TTL", []string{"entry", "create", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix:uid:1", "-x509SVIDTTL", "-1"}, 2, []string{"TTL"}},
		{"oversize batch", []string{"entry", "create", "-data", oversize}, 1, []string{"InvalidArgument", "10001", "limit of 10000"}},
		{"bad entry in a batch", []string{"entry", "create", "-data", badInBatch}, 1, []string{"InvalidArgument", "entry 1"}},
		{"missing -data file", []string{"entry", "create", "-data", filepath.Join(e.dir, "nope.json")}, 1, []string{"-data", "nope.json"}},
		{"-data and flags", []string{"entry", "create", "-data", badInBatch, "-spiffeID", "spiffe://example.org/x"}, 2, []string{"exclusive"}},
		{"bad output", []string{"entry", "show", "-output", "yaml"}, 2, []string{"-output", "yaml"}},
		{"unknown subcommand", []string{"entry", "list"}, 2, []string{"unknown subcommand", "list"}},
		{"update without ID", []string{"entry", "update", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix:uid:1"}, 2, []string{"-entryID"}},
		{"update of a missing entry", []string{"entry", "update", "-entryID", "no-such-entry", "-spiffeID", "spiffe://example.org/x", "-parentID", agentA, "-selector", "unix:uid:1"}, 1, []string{"NotFound", "no-such-entry"}},
		{"delete without ID", []string{"entry", "delete"}, 2, []string{"-entryID"}},
		{"delete of a missing entry", []string{"entry", "delete", "-entryID", "no-such-entry"}, 1, []string{"NotFound", "no-such-entry"}},
	}
	for _, r := range refusals {
		t.Run(r.name, func(t *testing.T) {
			code, out, errOut := e.run(r.args...)
			if code != r.wantCode {
				t.Errorf("exit %d, want %d (stdout %q, stderr %q)", code, r.wantCode, out, errOut)
			}
			for _, w := range r.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q does not mention %q", errOut, w)
				}
			}
			if stutters(errOut) {
				t.Errorf("stderr %q says the same thing twice", errOut)
			}
		})
	}
	if n := len(parseEntries(t, e.mustRun("entry", "show", "-output", "json"))); n != countBefore {
		t.Errorf("%d entries after the refused commands, want %d: a refusal stored something", n, countBefore)
	}
}

// stutters reports an error message with the same context twice in a row
// ("deleting entry x: deleting entry x: not found").
func stutters(msg string) bool {
	parts := strings.Split(strings.TrimSpace(msg), ": ")
	for i := 1; i < len(parts); i++ {
		if parts[i] == parts[i-1] {
			return true
		}
	}
	return false
}

func bigBatch(n int) string {
	var b strings.Builder
	b.WriteString(`{"entries": [`)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"spiffe_id":"spiffe://example.org/w/%d","parent_id":"%s","selectors":[{"type":"unix","value":"uid:%d"}]}`, i, agentA, i)
	}
	b.WriteString("]}")
	return b.String()
}

func (e *env) addNode(ekHash string, selectors ...store.Selector) string {
	e.t.Helper()
	id := "spiffe://example.org/ironroot/agent/tpm/" + ekHash
	_, err := e.srv.Store().UpsertNode(context.Background(), &store.Node{
		SPIFFEID: id, EKHash: ekHash,
		Selectors:    append([]store.Selector{{Type: "tpm", Value: "ek_hash:" + ekHash}}, selectors...),
		Evidence:     []byte(`{"manufacturer":"id:53574D20","secure_boot":"enabled","pcrs":{"7":"ab"}}`),
		CertSerial:   "123456789",
		CertNotAfter: time.Now().Add(time.Hour).Truncate(time.Second),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

func TestAgentCommands(t *testing.T) {
	e := newEnv(t)
	hashA, hashB := strings.Repeat("a", 64), strings.Repeat("b", 64)
	idA := e.addNode(hashA, store.Selector{Type: "tpm", Value: "manufacturer:id:53574D20"}, store.Selector{Type: "tpm", Value: "secure_boot:enabled"})
	idB := e.addNode(hashB)

	out := e.mustRun("agent", "list")
	for _, want := range []string{"Found 2 attested agents", "SPIFFE ID         : " + idA, "SPIFFE ID         : " + idB,
		"EK hash           : " + hashA, "Attestation type  : tpm", "Serial number     : 123456789", "Banned            : false"} {
		if !strings.Contains(out, want) {
			t.Errorf("agent list lacks %q:\n%s", want, out)
		}
	}

	out = e.mustRun("agent", "show", "-spiffeID", idA)
	for _, want := range []string{"Found 1 attested agent:", "Selector          : tpm:ek_hash:" + hashA,
		"Selector          : tpm:manufacturer:id:53574D20", "Selector          : tpm:secure_boot:enabled",
		"Evidence          : {", `"manufacturer": "id:53574D20"`, `"secure_boot": "enabled"`} {
		if !strings.Contains(out, want) {
			t.Errorf("agent show lacks %q:\n%s", want, out)
		}
	}
	var shown struct {
		Agents []struct {
			Agent struct {
				SPIFFEID  string `json:"spiffe_id"`
				Selectors []struct {
					Type, Value string
				} `json:"selectors"`
			} `json:"agent"`
			Evidence map[string]any `json:"evidence"`
		} `json:"agents"`
	}
	if err := json.Unmarshal([]byte(e.mustRun("agent", "show", "-spiffeID", idA, "-output", "json")), &shown); err != nil {
		t.Fatal(err)
	}
	if len(shown.Agents) != 1 || shown.Agents[0].Agent.SPIFFEID != idA || len(shown.Agents[0].Agent.Selectors) != 3 || shown.Agents[0].Evidence["secure_boot"] != "enabled" {
		t.Errorf("agent show -output json = %+v", shown)
	}

	if out := e.mustRun("agent", "ban", "-spiffeID", idB); !strings.Contains(out, "Agent banned successfully") {
		t.Errorf("agent ban said %q", out)
	}
	if out := e.mustRun("agent", "show", "-spiffeID", idB); !strings.Contains(out, "Banned            : true") {
		t.Errorf("banned agent shows:\n%s", out)
	}
	if out := e.mustRun("agent", "evict", "-spiffeID", idA); !strings.Contains(out, "Agent evicted successfully") {
		t.Errorf("agent evict said %q", out)
	}
	if out := e.mustRun("agent", "list"); strings.Contains(out, idA) || !strings.Contains(out, "Found 1 attested agent:") {
		t.Errorf("after evicting A, agent list:\n%s", out)
	}

	refusals := []struct {
		name     string
		args     []string
		wantCode int
		want     []string
	}{
		{"show evicted", []string{"agent", "show", "-spiffeID", idA}, 1, []string{"NotFound", idA}},
		{"evict unknown", []string{"agent", "evict", "-spiffeID", idA}, 1, []string{"NotFound"}},
		{"ban unknown", []string{"agent", "ban", "-spiffeID", idA}, 1, []string{"NotFound"}},
		{"not an agent ID", []string{"agent", "show", "-spiffeID", "spiffe://example.org/web"}, 1, []string{"InvalidArgument", "not an agent ID"}},
		{"foreign trust domain", []string{"agent", "evict", "-spiffeID", "spiffe://other.org/ironroot/agent/tpm/" + hashB}, 1, []string{"InvalidArgument", "not an agent ID of example.org"}},
		{"bad ID", []string{"agent", "ban", "-spiffeID", "not-an-id"}, 2, []string{"-spiffeID"}},
		{"missing ID", []string{"agent", "show"}, 2, []string{"-spiffeID is required"}},
		{"unknown subcommand", []string{"agent", "delete"}, 2, []string{"unknown subcommand"}},
	}
	for _, r := range refusals {
		t.Run(r.name, func(t *testing.T) {
			code, _, errOut := e.run(r.args...)
			if code != r.wantCode {
				t.Errorf("exit %d, want %d (%s)", code, r.wantCode, errOut)
			}
			for _, w := range r.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q does not mention %q", errOut, w)
				}
			}
		})
	}
}

func TestBundleShow(t *testing.T) {
	e := newEnv(t)
	want := e.srv.CA().Bundle()

	out := e.mustRun("bundle", "show")
	var certs []*x509.Certificate
	rest := []byte(out)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			t.Errorf("PEM block %q in the bundle, want CERTIFICATE only", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("parsing bundle PEM: %v", err)
		}
		certs = append(certs, c)
	}
	if len(certs) != len(want.X509Authorities) || len(certs) == 0 || !certs[0].Equal(e.srv.CA().ActiveCA()) {
		t.Fatalf("bundle show printed %d certificates, want the %d CA certificates starting with the active CA", len(certs), len(want.X509Authorities))
	}
	if !certs[0].IsCA || len(certs[0].URIs) != 1 || certs[0].URIs[0].String() != "spiffe://example.org" {
		t.Errorf("CA certificate: IsCA=%t URIs=%v", certs[0].IsCA, certs[0].URIs)
	}
	if pemOut := e.mustRun("bundle", "show", "-format", "pem"); pemOut != out {
		t.Error("-format pem differs from the default")
	}

	out = e.mustRun("bundle", "show", "-format", "spiffe")
	sb, err := spiffebundle.Parse(td, []byte(out))
	if err != nil {
		t.Fatalf("spiffebundle.Parse of bundle show -format spiffe: %v\n%s", err, out)
	}
	got := sb.X509Authorities()
	if len(got) != len(want.X509Authorities) || !got[0].Equal(want.X509Authorities[0]) {
		t.Errorf("SPIFFE bundle X.509 authorities differ from the CA's")
	}
	for _, k := range want.JWTAuthorities {
		if !sb.HasJWTAuthority(k.KeyID) {
			t.Errorf("SPIFFE bundle lacks JWT authority %s", k.KeyID)
		}
	}
	if seq, ok := sb.SequenceNumber(); !ok || seq != uint64(want.Sequence) {
		t.Errorf("sequence %d (%t), want %d", seq, ok, want.Sequence)
	}
	// Round trip: what go-spiffe marshals back parses to the same bundle.
	doc, err := sb.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	again, err := spiffebundle.Parse(td, doc)
	if err != nil || !again.Equal(sb) {
		t.Errorf("round trip through go-spiffe changed the bundle (%v)", err)
	}

	if code, _, errOut := e.run("bundle", "show", "-format", "jwks"); code != 2 || !strings.Contains(errOut, "-format") {
		t.Errorf("bad -format: exit %d %q", code, errOut)
	}
	if code, _, errOut := e.run("bundle", "list"); code != 2 || !strings.Contains(errOut, "show") {
		t.Errorf("bad subcommand: exit %d %q", code, errOut)
	}
}

func TestCAShow(t *testing.T) {
	e := newEnv(t)
	x509Auths, jwtAuths := e.srv.CA().X509Authorities(), e.srv.CA().JWTAuthorities()
	out := e.mustRun("ca", "show")
	for _, want := range []string{"x509  active    " + x509Auths[0].Record.ID, "jwt   active    " + jwtAuths[0].Record.ID,
		"Key        : pkcs11:", "Key ID     : " + jwtAuths[0].KeyID, "Not after  : "} {
		if !strings.Contains(out, want) {
			t.Errorf("ca show lacks %q:\n%s", want, out)
		}
	}
	// pin-source names the PIN file, which is fine; the PIN itself never shows.
	if strings.Contains(out, "pin-value") || strings.Contains(out, e.pin) {
		t.Errorf("ca show prints the PIN:\n%s", out)
	}
	var resp struct {
		Authorities []struct {
			Kind     string `json:"kind"`
			ID       string `json:"id"`
			State    string `json:"state"`
			KeyURI   string `json:"key_uri"`
			NotAfter string `json:"not_after"`
		} `json:"authorities"`
	}
	if err := json.Unmarshal([]byte(e.mustRun("ca", "show", "-output", "json")), &resp); err != nil {
		t.Fatal(err)
	}
	if len(resp.Authorities) != len(x509Auths)+len(jwtAuths) {
		t.Fatalf("ca show -output json lists %d authorities, want %d", len(resp.Authorities), len(x509Auths)+len(jwtAuths))
	}
	for _, a := range resp.Authorities {
		if !strings.HasPrefix(a.KeyURI, "pkcs11:") || !strings.Contains(a.KeyURI, "token=") || !strings.Contains(a.KeyURI, "id=") {
			t.Errorf("authority %s key URI %q is not a pkcs11: URI naming token and id", a.ID, a.KeyURI)
		}
		if a.State != "active" || a.NotAfter == "" {
			t.Errorf("authority %s: state %q not_after %q", a.ID, a.State, a.NotAfter)
		}
	}
}

func TestHealthcheck(t *testing.T) {
	e := newEnv(t)
	if out := e.mustRun("healthcheck"); out != "Server is healthy.\n" {
		t.Errorf("healthcheck said %q", out)
	}
	if out := e.mustRun("healthcheck", "-verbose"); !strings.Contains(out, "Checking server health at "+e.sock) {
		t.Errorf("healthcheck -verbose said %q", out)
	}
	var errb bytes.Buffer
	c := &cli.CLI{Stdout: &bytes.Buffer{}, Stderr: &errb}
	if code := c.Main(context.Background(), []string{"healthcheck", "-socketPath", filepath.Join(e.dir, "none.sock")}); code != 1 || !strings.Contains(errb.String(), "unhealthy") {
		t.Errorf("healthcheck against no server: exit %d %q, want 1 and unhealthy", code, errb.String())
	}
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args     []string
		wantCode int
		want     string
	}{
		{nil, 2, "Usage: ironroot-server"},
		{[]string{"help"}, 0, "entry"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"entry"}, 2, "want a subcommand"},
		{[]string{"entry", "show", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"entry", "show", "-nope"}, 2, "-nope"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		c := &cli.CLI{Stdout: &out, Stderr: &errb}
		if code := c.Main(context.Background(), tc.args); code != tc.wantCode || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%v: exit %d %q, want %d and %q", tc.args, code, errb.String(), tc.wantCode, tc.want)
		}
	}
}
