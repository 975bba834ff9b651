package cli

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"
)

func apiCmd(ctx context.Context, c *CLI, args []string) error {
	return subcommand(ctx, c, "ironroot-agent api", map[string]command{
		"fetch":    {"fetch X509-SVIDs (x509) or JWT-SVIDs (jwt)", fetchCmd},
		"validate": {"validate a JWT-SVID (jwt)", validateCmd},
		"watch":    {"print every X509-SVID update until interrupted", watchCmd},
	}, args)
}

func fetchCmd(ctx context.Context, c *CLI, args []string) error {
	return subcommand(ctx, c, "ironroot-agent api fetch", map[string]command{
		"x509": {"fetch the X509-SVIDs and bundles; -write saves them as PEM files", fetchX509Cmd},
		"jwt":  {"fetch JWT-SVIDs for an audience, and the JWT bundles", fetchJWTCmd},
	}, args)
}

func validateCmd(ctx context.Context, c *CLI, args []string) error {
	return subcommand(ctx, c, "ironroot-agent api validate", map[string]command{
		"jwt": {"validate a JWT-SVID for an audience", validateJWTCmd},
	}, args)
}

// client connects a go-spiffe Workload API client; gRPC dials lazily, so
// errors show on the first call.
func (s *socketFlags) client(ctx context.Context, c *CLI) (*gsw.Client, error) {
	addr, err := s.address(c)
	if err != nil {
		return nil, err
	}
	cl, err := gsw.New(ctx, gsw.WithAddr(addr))
	if err != nil {
		return nil, fmt.Errorf("connecting to the Workload API at %s: %w", addr, err)
	}
	return cl, nil
}

func fetchX509Cmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "api fetch x509")
	var sf socketFlags
	sf.register(fs)
	write := fs.String("write", "", "directory to write svid.N.pem, svid.N.key, bundle.N.pem and federated_bundle.N.M.pem to")
	silent := fs.Bool("silent", false, "print nothing (with -write)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := sf.check(); err != nil {
		return err
	}
	cl, err := sf.client(ctx, c)
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	start := time.Now()
	x509ctx, err := cl.FetchX509Context(ctx)
	if err != nil {
		return fmt.Errorf("fetching X509-SVIDs: %w", err)
	}
	elapsed := time.Since(start)
	if !*silent {
		printX509Context(c.Stdout, x509ctx, elapsed)
	}
	if *write != "" {
		return writeX509Context(c, *write, x509ctx, *silent)
	}
	return nil
}

func printX509Context(w io.Writer, x *gsw.X509Context, elapsed time.Duration) {
	noun := "svids"
	if len(x.SVIDs) == 1 {
		noun = "svid"
	}
	fmt.Fprintf(w, "Received %d %s after %s\n", len(x.SVIDs), noun, elapsed.Round(time.Microsecond))
	for _, s := range x.SVIDs {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "SPIFFE ID:\t\t%s\n", s.ID)
		if s.Hint != "" {
			fmt.Fprintf(w, "Hint:\t\t\t%s\n", s.Hint)
		}
		leaf := s.Certificates[0]
		fmt.Fprintf(w, "SVID Valid After:\t%s\n", leaf.NotBefore.UTC())
		fmt.Fprintf(w, "SVID Valid Until:\t%s\n", leaf.NotAfter.UTC())
		fmt.Fprintf(w, "SVID Serial:\t\t%x\n", leaf.SerialNumber)
		for i, ic := range s.Certificates[1:] {
			fmt.Fprintf(w, "Intermediate #%d Valid After:\t%s\n", i+1, ic.NotBefore.UTC())
			fmt.Fprintf(w, "Intermediate #%d Valid Until:\t%s\n", i+1, ic.NotAfter.UTC())
		}
		if b, ok := x.Bundles.Get(s.ID.TrustDomain()); ok {
			for i, ca := range b.X509Authorities() {
				fmt.Fprintf(w, "CA #%d Valid After:\t%s\n", i+1, ca.NotBefore.UTC())
				fmt.Fprintf(w, "CA #%d Valid Until:\t%s\n", i+1, ca.NotAfter.UTC())
			}
		}
		if _, _, err := x509svid.Verify(s.Certificates, x.Bundles); err != nil {
			fmt.Fprintf(w, "Chain:\t\t\tDOES NOT VERIFY: %v\n", err)
		} else {
			fmt.Fprintf(w, "Chain:\t\t\t%d certificate(s), verifies against the %s bundle\n", len(s.Certificates), s.ID.TrustDomain())
		}
		for _, td := range federatedTDs(x.Bundles, s.ID.TrustDomain()) {
			fmt.Fprintf(w, "Federated bundle:\t%s\n", td)
		}
	}
}

func federatedTDs(set *x509bundle.Set, own spiffeid.TrustDomain) []string {
	var out []string
	for _, b := range set.Bundles() {
		if b.TrustDomain() != own {
			out = append(out, b.TrustDomain().String())
		}
	}
	return out
}

// writeX509Context writes the files SPIRE's `api fetch x509 -write` does.
func writeX509Context(c *CLI, dir string, x *gsw.X509Context, silent bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	for i, s := range x.SVIDs {
		certs, key, err := s.Marshal()
		if err != nil {
			return fmt.Errorf("encoding SVID #%d: %w", i, err)
		}
		b, ok := x.Bundles.Get(s.ID.TrustDomain())
		if !ok {
			return fmt.Errorf("no bundle for the trust domain of SVID #%d (%s)", i, s.ID)
		}
		files := []struct {
			name string
			data []byte
			mode os.FileMode
			what string
		}{
			{fmt.Sprintf("svid.%d.pem", i), certs, 0o644, "SVID"},
			{fmt.Sprintf("svid.%d.key", i), key, 0o600, "key"},
			{fmt.Sprintf("bundle.%d.pem", i), pemCerts(b.X509Authorities()), 0o644, "bundle"},
		}
		for j, td := range federatedTDs(x.Bundles, s.ID.TrustDomain()) {
			fb, _ := x.Bundles.Get(spiffeid.RequireTrustDomainFromString(td))
			files = append(files, struct {
				name string
				data []byte
				mode os.FileMode
				what string
			}{fmt.Sprintf("federated_bundle.%d.%d.pem", i, j), pemCerts(fb.X509Authorities()), 0o644, "federated bundle"})
		}
		for _, f := range files {
			path := filepath.Join(dir, f.name)
			if !silent {
				fmt.Fprintf(c.Stdout, "Writing %s #%d to file %s.\n", f.what, i, path)
			}
			if err := writeFile(path, f.data, f.mode); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeFile replaces path atomically, so a reader never sees half a key,
// and gives it mode (also when it existed with another mode).
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func pemCerts(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func fetchJWTCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "api fetch jwt")
	var sf socketFlags
	sf.register(fs)
	var aud stringList
	fs.Var(&aud, "audience", "audience of the JWT-SVID (repeatable or comma-separated; required)")
	idFlag := fs.String("spiffeID", "", "fetch only the JWT-SVID of this SPIFFE ID")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := sf.check(); err != nil {
		return err
	}
	if len(aud) == 0 {
		return usagef("-audience is required")
	}
	params := jwtsvid.Params{Audience: aud[0], ExtraAudiences: aud[1:]}
	if *idFlag != "" {
		id, err := spiffeid.FromString(*idFlag)
		if err != nil {
			return usagef("-spiffeID: %v", err)
		}
		params.Subject = id
	}
	cl, err := sf.client(ctx, c)
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	svids, err := cl.FetchJWTSVIDs(ctx, params)
	if err != nil {
		return fmt.Errorf("fetching JWT-SVIDs: %w", err)
	}
	for _, s := range svids {
		fmt.Fprintf(c.Stdout, "token(%s):\n\t%s\n", s.ID, s.Marshal())
		if s.Hint != "" {
			fmt.Fprintf(c.Stdout, "hint(%s):\n\t%s\n", s.ID, s.Hint)
		}
		fmt.Fprintf(c.Stdout, "expires(%s):\n\t%s\n", s.ID, s.Expiry.UTC())
	}
	bundles, err := cl.FetchJWTBundles(ctx)
	if err != nil {
		return fmt.Errorf("fetching JWT bundles: %w", err)
	}
	for _, b := range bundles.Bundles() {
		jwks, err := b.Marshal()
		if err != nil {
			return fmt.Errorf("encoding the JWT bundle of %s: %w", b.TrustDomain(), err)
		}
		fmt.Fprintf(c.Stdout, "bundle(%s):\n\t%s\n", b.TrustDomain().IDString(), jwks)
	}
	return nil
}

func validateJWTCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "api validate jwt")
	var sf socketFlags
	sf.register(fs)
	audience := fs.String("audience", "", "audience the token must carry (required)")
	token := fs.String("svid", "", "the JWT-SVID to validate, or - to read it from standard input (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := sf.check(); err != nil {
		return err
	}
	if *audience == "" {
		return usagef("-audience is required")
	}
	tok := *token
	if tok == "-" {
		if c.Stdin == nil {
			return usagef("-svid -: no standard input")
		}
		line, err := bufio.NewReaderSize(c.Stdin, 64<<10).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("reading the JWT-SVID from standard input: %w", err)
		}
		tok = line
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return usagef("-svid is required")
	}
	cl, err := sf.client(ctx, c)
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	svid, err := cl.ValidateJWTSVID(ctx, tok, *audience)
	if err != nil {
		return fmt.Errorf("validating JWT-SVID: %w", err)
	}
	claims, err := json.Marshal(svid.Claims)
	if err != nil {
		return fmt.Errorf("encoding claims: %w", err)
	}
	fmt.Fprintln(c.Stdout, "SVID is valid.")
	fmt.Fprintf(c.Stdout, "SPIFFE ID : %s\n", svid.ID)
	fmt.Fprintf(c.Stdout, "Claims    : %s\n", claims)
	return nil
}

func watchCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "api watch")
	var sf socketFlags
	sf.registerSocket(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	cl, err := sf.client(ctx, c)
	if err != nil {
		return err
	}
	defer cl.Close()
	w := &printWatcher{out: c.Stdout, errOut: c.Stderr, last: time.Now()}
	err = cl.WatchX509Context(ctx, w)
	if ctx.Err() != nil {
		return nil // interrupted: the normal way to stop watching
	}
	return fmt.Errorf("watching X509-SVIDs: %w", err)
}

// printWatcher prints every update; go-spiffe reconnects by itself after
// errors, which are only reported.
type printWatcher struct {
	out, errOut io.Writer
	last        time.Time
}

func (p *printWatcher) OnX509ContextUpdate(x *gsw.X509Context) {
	now := time.Now()
	printX509Context(p.out, x, now.Sub(p.last))
	fmt.Fprintln(p.out)
	p.last = now
}

func (p *printWatcher) OnX509ContextWatchError(err error) {
	fmt.Fprintf(p.errOut, "Workload API error (retrying): %s\n", describe(err))
}
