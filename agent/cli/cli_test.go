package cli

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/workloadapi"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// testSource entitles workloads with the selector `entitled` to two SVIDs
// signed by a CA made in the test.
type testSource struct {
	entitled workloadapi.Selector
	snap     *workloadapi.Snapshot
	jwtKey   *ecdsa.PrivateKey
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newTestSource(t testing.TB, entitled string) *testSource {
	t.Helper()
	caKey := newKey(t)
	caCert, err := ca.NewCACertificate(ca.CAParams{TrustDomain: td, Signer: caKey, NotBefore: time.Now(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	src := &testSource{jwtKey: newKey(t)}
	if src.entitled, err = workloadapi.ParseSelector(entitled); err != nil {
		t.Fatal(err)
	}
	b := spiffebundle.New(td)
	b.AddX509Authority(caCert)
	if err := b.AddJWTAuthority("kid-1", src.jwtKey.Public()); err != nil {
		t.Fatal(err)
	}
	fedCA := newKey(t)
	fedTD := spiffeid.RequireTrustDomainFromString("partner.test")
	fedCert, err := ca.NewCACertificate(ca.CAParams{TrustDomain: fedTD, Signer: fedCA, NotBefore: time.Now(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	fed := spiffebundle.New(fedTD)
	fed.AddX509Authority(fedCert)
	src.snap = &workloadapi.Snapshot{Bundle: b, FederatedBundles: []*spiffebundle.Bundle{fed}}
	for _, p := range []struct{ path, hint string }{{"/web", "external"}, {"/db", ""}} {
		key := newKey(t)
		id := spiffeid.RequireFromPath(td, p.path)
		leaf, err := ca.SignX509SVID(caCert, caKey, ca.SVIDParams{ID: id, PublicKey: key.Public(), NotBefore: time.Now(), TTL: 30 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		src.snap.SVIDs = append(src.snap.SVIDs, workloadapi.X509SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key, Hint: p.hint})
	}
	return src
}

func (s *testSource) ok(sels []workloadapi.Selector) bool {
	for _, sel := range sels {
		if sel == s.entitled {
			return true
		}
	}
	return false
}

func (s *testSource) Subscribe(_ context.Context, sels []workloadapi.Selector) (workloadapi.Subscription, error) {
	if !s.ok(sels) {
		return workloadapi.NewFeed(&workloadapi.Snapshot{Bundle: s.snap.Bundle}, nil), nil
	}
	return workloadapi.NewFeed(s.snap, nil), nil
}

func (s *testSource) FetchJWTSVIDs(_ context.Context, sels []workloadapi.Selector, aud []string, id spiffeid.ID) ([]workloadapi.JWTSVID, error) {
	if !s.ok(sels) {
		return nil, workloadapi.ErrNoIdentity
	}
	var out []workloadapi.JWTSVID
	for _, v := range s.snap.SVIDs {
		if !id.IsZero() && v.ID != id {
			continue
		}
		tok, exp, err := ca.SignJWTSVID(s.jwtKey, "kid-1", ca.JWTParams{ID: v.ID, Audience: aud, IssuedAt: time.Now(), TTL: 5 * time.Minute})
		if err != nil {
			return nil, err
		}
		out = append(out, workloadapi.JWTSVID{ID: v.ID, Token: tok, ExpiresAt: exp, Hint: v.Hint})
	}
	return out, nil
}

// serve starts a Workload API server for src and returns its socket path.
func serve(t *testing.T, src workloadapi.Source) string {
	t.Helper()
	sock, _ := serveWith(t, src)
	return sock
}

func serveWith(t *testing.T, src workloadapi.Source) (string, *workloadapi.Server) {
	t.Helper()
	srv, err := workloadapi.New(unix.New(), src)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "api.sock")
	lis, err := workloadapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, srv
}

func mySelector() string { return "unix:uid:" + strconv.Itoa(os.Geteuid()) }

// syncBuffer is a bytes.Buffer safe for the watch goroutine.
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

type result struct {
	code           int
	stdout, stderr string
}

func run(ctx context.Context, c *CLI, args ...string) result {
	var out, errOut syncBuffer
	c.Stdout, c.Stderr = &out, &errOut
	code := c.Main(ctx, args)
	return result{code, out.String(), errOut.String()}
}

func noEnv(string) string { return "" }

func TestFetchX509(t *testing.T) {
	src := newTestSource(t, mySelector())
	sock := serve(t, src)
	denied := serve(t, newTestSource(t, "unix:uid:4294967000"))
	dir := filepath.Join(t.TempDir(), "out")

	tests := []struct {
		name     string
		args     []string
		env      string
		code     int
		stdout   []string
		stderr   string
		wantFile bool
	}{
		{"prints identities", []string{"api", "fetch", "x509", "-socketPath", sock}, "", 0,
			[]string{"Received 2 svids", "SPIFFE ID:\t\tspiffe://example.org/web", "Hint:\t\t\texternal", "SPIFFE ID:\t\tspiffe://example.org/db", "SVID Valid Until:", "CA #1 Valid Until:", "verifies against the example.org bundle", "Federated bundle:\tpartner.test"}, "", false},
		{"socket from the environment, unix:// address", []string{"api", "fetch", "x509"}, workloadapi.SocketPathAddress(sock), 0, []string{"Received 2 svids"}, "", false},
		{"flag as an address", []string{"api", "fetch", "x509", "-socketPath", "unix://" + sock}, "", 0, []string{"Received 2 svids"}, "", false},
		{"writes files", []string{"api", "fetch", "x509", "-socketPath", sock, "-write", dir}, "", 0,
			[]string{"Writing SVID #0 to file " + filepath.Join(dir, "svid.0.pem"), "Writing key #1 to file " + filepath.Join(dir, "svid.1.key")}, "", true},
		{"no identity", []string{"api", "fetch", "x509", "-socketPath", denied}, "", 1, nil, "PermissionDenied: no identity issued", false},
		{"no agent", []string{"api", "fetch", "x509", "-socketPath", filepath.Join(t.TempDir(), "none.sock")}, "", 1, nil, "Unavailable", false},
		{"bad address", []string{"api", "fetch", "x509", "-socketPath", "unix://relative/x"}, "", 2, nil, "-socketPath", false},
		{"bad timeout", []string{"api", "fetch", "x509", "-timeout", "0s"}, "", 2, nil, "-timeout", false},
		{"stray argument", []string{"api", "fetch", "x509", "extra"}, "", 2, nil, "unexpected argument", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := &CLI{Getenv: func(k string) string {
				if k == workloadapi.SocketEnv {
					return tc.env
				}
				return ""
			}}
			r := run(testCtx(t), c, tc.args...)
			if r.code != tc.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", r.code, tc.code, r.stdout, r.stderr)
			}
			for _, s := range tc.stdout {
				if !strings.Contains(r.stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, r.stdout)
				}
			}
			if tc.stderr != "" && !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("stderr %q lacks %q", r.stderr, tc.stderr)
			}
			if tc.wantFile {
				checkWritten(t, dir, src)
			}
		})
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// checkWritten loads the written files as a workload would.
func checkWritten(t *testing.T, dir string, src *testSource) {
	t.Helper()
	for i, want := range src.snap.SVIDs {
		svid, err := x509svid.Load(filepath.Join(dir, "svid."+strconv.Itoa(i)+".pem"), filepath.Join(dir, "svid."+strconv.Itoa(i)+".key"))
		if err != nil {
			t.Fatalf("loading SVID #%d: %v", i, err)
		}
		if svid.ID != want.ID {
			t.Errorf("SVID #%d is %s, want %s", i, svid.ID, want.ID)
		}
		fi, err := os.Stat(filepath.Join(dir, "svid."+strconv.Itoa(i)+".key"))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
		}
		raw, err := os.ReadFile(filepath.Join(dir, "bundle."+strconv.Itoa(i)+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(raw)
		if blk == nil || !bytes.Equal(blk.Bytes, src.snap.Bundle.X509Authorities()[0].Raw) {
			t.Errorf("bundle.%d.pem does not hold the CA", i)
		}
		if _, err := os.Stat(filepath.Join(dir, "federated_bundle."+strconv.Itoa(i)+".0.pem")); err != nil {
			t.Errorf("federated bundle file: %v", err)
		}
	}
}

var tokenLine = regexp.MustCompile(`token\((spiffe://[^)]+)\):\n\t(\S+)`)

func TestFetchAndValidateJWT(t *testing.T) {
	src := newTestSource(t, mySelector())
	sock := serve(t, src)
	c := &CLI{Getenv: noEnv}
	ctx := testCtx(t)

	r := run(ctx, c, "api", "fetch", "jwt", "-socketPath", sock, "-audience", "db,api", "-audience", "web")
	if r.code != 0 {
		t.Fatalf("fetch jwt: exit %d: %s", r.code, r.stderr)
	}
	m := tokenLine.FindAllStringSubmatch(r.stdout, -1)
	if len(m) != 2 || m[0][1] != "spiffe://example.org/web" || m[1][1] != "spiffe://example.org/db" {
		t.Fatalf("tokens %v in:\n%s", m, r.stdout)
	}
	if !strings.Contains(r.stdout, "bundle(spiffe://example.org):") || !strings.Contains(r.stdout, `"kid":"kid-1"`) {
		t.Errorf("no JWT bundle printed:\n%s", r.stdout)
	}
	jb := jwtbundle.FromJWTAuthorities(td, src.snap.Bundle.JWTAuthorities())
	tok, err := jwtsvid.ParseAndValidate(m[0][2], jb, []string{"db", "api", "web"})
	if err != nil {
		t.Fatalf("printed token does not validate: %v", err)
	}
	if tok.ID.Path() != "/web" {
		t.Errorf("token for %s", tok.ID)
	}

	r = run(ctx, c, "api", "fetch", "jwt", "-socketPath", sock, "-audience", "db", "-spiffeID", "spiffe://example.org/db")
	if m := tokenLine.FindAllStringSubmatch(r.stdout, -1); r.code != 0 || len(m) != 1 || m[0][1] != "spiffe://example.org/db" {
		t.Errorf("fetch jwt -spiffeID: exit %d, tokens %v, stderr %s", r.code, m, r.stderr)
	}

	token := m[0][2]
	tests := []struct {
		name   string
		args   []string
		stdin  string
		code   int
		stdout string
		stderr string
	}{
		{"valid", []string{"-audience", "api", "-svid", token}, "", 0, "SPIFFE ID : spiffe://example.org/web", ""},
		{"from stdin", []string{"-audience", "web", "-svid", "-"}, token + "\n", 0, "SVID is valid.", ""},
		{"wrong audience", []string{"-audience", "other", "-svid", token}, "", 1, "", "InvalidArgument"},
		{"garbage", []string{"-audience", "api", "-svid", "not.a.jwt"}, "", 1, "", "InvalidArgument"},
		{"no audience", []string{"-svid", token}, "", 2, "", "-audience is required"},
		{"no token", []string{"-audience", "api"}, "", 2, "", "-svid is required"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := &CLI{Getenv: noEnv, Stdin: strings.NewReader(tc.stdin)}
			r := run(ctx, c, append([]string{"api", "validate", "jwt", "-socketPath", sock}, tc.args...)...)
			if r.code != tc.code || !strings.Contains(r.stdout, tc.stdout) || !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("exit %d (want %d); stdout %q (want %q); stderr %q (want %q)", r.code, tc.code, r.stdout, tc.stdout, r.stderr, tc.stderr)
			}
		})
	}

	for _, args := range [][]string{
		{"api", "fetch", "jwt", "-socketPath", sock},
		{"api", "fetch", "jwt", "-socketPath", sock, "-audience", "a", "-spiffeID", "nope"},
	} {
		if r := run(ctx, c, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, r.code, r.stderr)
		}
	}
	denied := serve(t, newTestSource(t, "unix:uid:4294967000"))
	if r := run(ctx, c, "api", "fetch", "jwt", "-socketPath", denied, "-audience", "a"); r.code != 1 || !strings.Contains(r.stderr, "PermissionDenied") {
		t.Errorf("unentitled fetch jwt: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestWatch(t *testing.T) {
	sock := serve(t, newTestSource(t, mySelector()))
	ctx, cancel := context.WithCancel(testCtx(t))
	var out, errOut syncBuffer
	c := &CLI{Getenv: noEnv, Stdout: &out, Stderr: &errOut}
	done := make(chan int, 1)
	go func() { done <- c.Main(ctx, []string{"api", "watch", "-socketPath", sock}) }()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "spiffe://example.org/db") {
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("no update printed; stdout %q stderr %q", out.String(), errOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("watch exited %d after interrupt: %s", code, errOut.String())
	}
}

func TestHealthcheck(t *testing.T) {
	sock := serve(t, newTestSource(t, mySelector()))
	notServing, srv := serveWith(t, newTestSource(t, mySelector()))
	srv.SetServing(false)
	ctx := testCtx(t)
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"healthy", []string{"-socketPath", sock}, 0, "Agent is healthy.", ""},
		{"verbose", []string{"-socketPath", sock, "-verbose"}, 0, "Checking agent health at unix://" + sock, ""},
		{"shallow", []string{"-socketPath", sock, "-shallow"}, 0, "Agent is healthy.", ""},
		{"no agent", []string{"-socketPath", filepath.Join(t.TempDir(), "x.sock")}, 1, "", "agent is unhealthy: Unavailable"},
		{"not serving", []string{"-socketPath", notServing}, 1, "", "agent is unhealthy: NOT_SERVING"},
		{"bad flag", []string{"-nope"}, 2, "", "flag provided but not defined"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(ctx, &CLI{Getenv: noEnv}, append([]string{"healthcheck"}, tc.args...)...)
			if r.code != tc.code || !strings.Contains(r.stdout, tc.stdout) || !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("exit %d (want %d); stdout %q (want %q); stderr %q (want %q)", r.code, tc.code, r.stdout, tc.stdout, r.stderr, tc.stderr)
			}
		})
	}
}

func TestCommandLine(t *testing.T) {
	var gotArgs []string
	runHook := func(_ context.Context, args []string) error {
		gotArgs = args
		if len(args) > 0 && args[0] == "-fail" {
			return errors.New("boom")
		}
		return nil
	}
	for _, tc := range []struct {
		name   string
		run    func(context.Context, []string) error
		args   []string
		code   int
		stderr string
	}{
		{"no command", nil, nil, 2, "Usage: ironroot-agent"},
		{"help", nil, []string{"help"}, 0, "healthcheck"},
		{"unknown", nil, []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"api without subcommand", nil, []string{"api"}, 2, "a subcommand is required"},
		{"api help", nil, []string{"api", "-h"}, 0, "Usage: ironroot-agent api"},
		{"unknown fetch kind", nil, []string{"api", "fetch", "x511"}, 2, `unknown subcommand "x511"`},
		{"fetch x509 help", nil, []string{"api", "fetch", "x509", "-h"}, 0, "-socketPath"},
		{"run without hook", nil, []string{"run"}, 1, "not available"},
		{"run", runHook, []string{"run", "-config", "a.hcl"}, 0, ""},
		{"run fails", runHook, []string{"run", "-fail"}, 1, "boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(context.Background(), &CLI{Run: tc.run, Getenv: noEnv}, tc.args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("exit %d (want %d); stderr %q (want %q)", r.code, tc.code, r.stderr, tc.stderr)
			}
		})
	}
	if strings.Join(gotArgs, " ") != "-fail" {
		t.Errorf("Run got %q", gotArgs)
	}
}

func TestSocketAddress(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		flag, env, want string
		usage           bool
	}{
		{"", "", "unix:///tmp/ironroot-agent/public/api.sock", false},
		{"", "unix:///run/a.sock", "unix:///run/a.sock", false},
		{"/run/b.sock", "unix:///run/a.sock", "unix:///run/b.sock", false},
		{"rel.sock", "", "unix://" + filepath.Join(wd, "rel.sock"), false},
		{"tcp://127.0.0.1:8000", "", "tcp://127.0.0.1:8000", false},
		{"tcp://localhost:8000", "", "", true},
		{"unix://rel/a", "", "", true},
	} {
		s := socketFlags{socketPath: tc.flag}
		got, err := s.address(&CLI{Getenv: func(string) string { return tc.env }})
		var ue usageError
		if tc.usage {
			if !errors.As(err, &ue) {
				t.Errorf("address(%q, env %q) = %q, %v; want a usage error", tc.flag, tc.env, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("address(%q, env %q) = %q, %v; want %q", tc.flag, tc.env, got, err, tc.want)
		}
	}
}
