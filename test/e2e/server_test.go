package e2e

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"regexp"
	"strings"
	"testing"
)

// The server starts from server.hcl with its CA key in SoftHSM, serves its
// admin CLI, and publishes a bundle that is its CA in the trust domain.
func TestServerCLI(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	parent := "spiffe://" + trustDomain + "/ironroot/agent/tpm/" + strings.Repeat("ab", 32)

	out := srv.cli(t, "entry", "create", "-spiffeID", "spiffe://"+trustDomain+"/web", "-parentID", parent,
		"-selector", "unix:uid:1000", "-selector", "unix:path:/usr/bin/web", "-x509SVIDTTL", "600")
	idRE := regexp.MustCompile(`(?m)^Entry ID\s+: (\S+)$`)
	m := idRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("entry create printed no entry ID:\n%s", out)
	}
	entryID := m[1]

	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"by ID", []string{"entry", "show", "-entryID", entryID}, []string{
			"Found 1 entry", "SPIFFE ID        : spiffe://example.org/web", "Parent ID        : " + parent,
			"Selector         : unix:uid:1000", "Selector         : unix:path:/usr/bin/web", "X509-SVID TTL    : 10m0s",
		}},
		{"by parent", []string{"entry", "show", "-parentID", parent}, []string{"Found 1 entry", entryID}},
		{"by selector", []string{"entry", "show", "-selector", "unix:uid:1000", "-selector", "unix:path:/usr/bin/web"}, []string{"Found 1 entry"}},
		{"no match", []string{"entry", "show", "-spiffeID", "spiffe://example.org/nobody"}, []string{"Found 0 entries"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := srv.cli(t, tt.args...)
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}

	var listed struct {
		Entries []struct {
			ID       string `json:"id"`
			SpiffeID string `json:"spiffe_id"`
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(srv.cli(t, "entry", "show", "-output", "json")), &listed); err != nil {
		t.Fatalf("entry show -output json: %v", err)
	}
	if len(listed.Entries) != 1 || listed.Entries[0].ID != entryID {
		t.Errorf("entry show -output json = %+v, want the one entry %s", listed.Entries, entryID)
	}

	// Refusals: a duplicate entry, and a command-line mistake (exit 2).
	if code, _, stderr := srv.tryCLI(t, "entry", "create", "-spiffeID", "spiffe://"+trustDomain+"/web", "-parentID", parent,
		"-selector", "unix:uid:1000", "-selector", "unix:path:/usr/bin/web"); code != 1 || stderr == "" {
		t.Errorf("duplicate entry: exit %d, stderr %q; want 1 and a message", code, stderr)
	}
	if code, _, _ := srv.tryCLI(t, "entry", "create", "-spiffeID", "spiffe://"+trustDomain+"/x"); code != 2 {
		t.Errorf("entry without parent or selector: exit %d, want 2", code)
	}

	// The bundle is the server's CA for the trust domain, with its key on
	// the token.
	path := srv.bundle(t)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cas []*x509.Certificate
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatalf("bundle certificate: %v", err)
		}
		cas = append(cas, c)
	}
	if len(cas) == 0 {
		t.Fatalf("bundle show printed no certificate:\n%s", b)
	}
	for _, c := range cas {
		if !c.IsCA || len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://"+trustDomain {
			t.Errorf("bundle certificate %s: IsCA %v, URIs %v; want a CA for spiffe://%s", c.Subject, c.IsCA, c.URIs, trustDomain)
		}
	}
	if !strings.Contains(srv.cli(t, "bundle", "show", "-format", "spiffe"), `"keys"`) {
		t.Error("bundle show -format spiffe printed no JWKS keys")
	}
	// The token's URI names the pin file, never the PIN.
	if strings.Contains(srv.stderr.String(), "pin-value") {
		t.Error("the server logged a pin-value")
	}
}
