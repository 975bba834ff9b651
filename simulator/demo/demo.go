// Package demo is Ironroot's hardware smoke demo (`make demo`, `ironroot-sim
// demo`): it stands up a software TPM and a SoftHSM2 token with the simulator
// harness, runs the full TPM attestation protocol of package tpm against
// package tpm/verifier, signs a certificate for the TPM-resident key with a
// key generated in the HSM, shows a TPM from another manufacturer being
// refused, and prints every check that passed.
//
// It lives beside package simulator rather than in it because it uses tpm,
// tpm/verifier and hsm, whose own tests use simulator.
package demo

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/hsm"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/tpm"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// Layout of the demo directory.
const (
	// MarkerFile marks a directory as the demo's own: only such a directory
	// (or an empty or missing one) is cleared at the start of a run.
	MarkerFile = ".ironroot-demo"
	// PIDFile holds the pid of the swtpm the demo runs, while it runs, so
	// `demo.sh down` can stop one left behind.
	PIDFile = "swtpm.pid"

	caDir        = "ca"
	stateDir     = "tpm"
	foreignDir   = "foreign"
	hsmDir       = "hsm"
	certsDir     = "certs"
	tokenLabel   = "ironroot-demo"
	hsmKeyLabel  = "demo-ca"
	runTimeout   = 3 * time.Minute
	certLifetime = time.Hour
)

// Checks are the names of the checks the demo prints, in order; each is
// printed as "[ok] <name>" once it passed.
var Checks = []string{
	"EK certificate chain",
	"agent ID",
	"AK properties",
	"credential activation",
	"quote nonce and PCR selection",
	"PCR values",
	"TPM clock",
	"certified TPM-resident key",
	"re-attestation after a reboot",
	"HSM key attributes",
	"CSR signed inside the TPM",
	"certificate signed by the HSM key",
	"certificate verifies",
	"TPM of another manufacturer refused",
}

type config struct {
	trustDomain string
	logger      *slog.Logger
}

// Option configures Run.
type Option func(*config)

// WithTrustDomain sets the trust domain of the agent ID (default
// example.org).
func WithTrustDomain(td string) Option { return func(c *config) { c.trustDomain = td } }

// WithLogger sets the logger given to the verifier, the TPM and the HSM
// (default: discard; the demo's own output goes to the writer).
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// nameWidth is the width of the check-name column of the report.
const nameWidth = 35

// printer writes the demo's report.
type printer struct {
	w      io.Writer
	passed int
}

func (p *printer) section(title string) { fmt.Fprintf(p.w, "\n== %s\n", title) }

func (p *printer) info(name, format string, args ...any) {
	fmt.Fprintf(p.w, "     %-*s %s\n", nameWidth, name, fmt.Sprintf(format, args...))
}

func (p *printer) ok(name, format string, args ...any) {
	p.passed++
	fmt.Fprintf(p.w, "[ok] %-*s %s\n", nameWidth, name, fmt.Sprintf(format, args...))
}

// more continues the previous line's detail.
func (p *printer) more(format string, args ...any) {
	fmt.Fprintf(p.w, "     %-*s %s\n", nameWidth, "", fmt.Sprintf(format, args...))
}

// Run runs the demo with all its state under dir (created; a previous demo's
// directory is cleared first, any other non-empty directory is refused) and
// writes its report to w. It stops every process it starts before
// returning, also on failure, and leaves the state in dir.
//
// SoftHSM reads SOFTHSM2_CONF once, when the PKCS#11 module is initialised,
// so Run sets it in the process environment to the demo's own configuration:
// run it in a process of its own, as `ironroot-sim demo` does.
func Run(ctx context.Context, w io.Writer, dir string, opts ...Option) error {
	cfg := config{trustDomain: "example.org", logger: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(&cfg)
	}
	td, err := spiffeid.TrustDomainFromString(cfg.trustDomain)
	if err != nil {
		return fmt.Errorf("trust domain %q: %w", cfg.trustDomain, err)
	}
	if dir == "" {
		return errors.New("no demo directory given")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("resolving demo directory %q: %w", dir, err)
	}
	if err := prepareDir(abs); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, runTimeout)
	defer cancel()
	start := time.Now()
	p := &printer{w: w}
	fmt.Fprintf(w, "Ironroot hardware smoke demo: state in %s\n", abs)
	d := &demo{cfg: cfg, td: td, dir: abs, p: p}
	if err := d.run(ctx); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nAll %d checks passed in %.1fs; swtpm stopped; state left in %s\n",
		p.passed, time.Since(start).Seconds(), abs)
	return nil
}

// demo carries the state between the steps of one run.
type demo struct {
	cfg config
	td  spiffeid.TrustDomain
	dir string
	p   *printer

	agentID  spiffeid.ID
	agentKey *tpm.Key
	result   *verifier.Result
}

func (d *demo) run(ctx context.Context) error {
	ca, stopTPM, err := d.attest(ctx)
	if err != nil {
		return err
	}
	// The TPM keeps running until the HSM has certified its key: the
	// agent's CSR is signed inside it.
	err = d.sign(ctx)
	stopTPM()
	if err != nil {
		return err
	}
	return d.refuseForeign(ctx, ca)
}

// prepareDir makes dir an empty demo directory: it creates it, or clears a
// previous demo's (stopping a swtpm that run left), and refuses anything
// else that is not empty.
func prepareDir(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("reading demo directory: %w", err)
	case len(entries) > 0:
		if _, err := os.Stat(filepath.Join(dir, MarkerFile)); err != nil {
			return fmt.Errorf("demo directory %s is not empty and was not made by the demo (no %s): refusing to clear it", dir, MarkerFile)
		}
		if err := StopLeftover(dir); err != nil {
			return err
		}
		for _, e := range entries {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("clearing the previous demo: %w", err)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating demo directory: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, MarkerFile), []byte("state of `ironroot-sim demo`; `make demo-down` removes it\n"), 0o600); err != nil {
		return fmt.Errorf("marking demo directory: %w", err)
	}
	return nil
}

// StopLeftover stops a swtpm a previous demo in dir left running (its pid
// in PIDFile, and only if that process is a swtpm serving a state under
// dir), then removes the pid file.
func StopLeftover(dir string) error {
	pidPath := filepath.Join(dir, PIDFile)
	b, err := os.ReadFile(pidPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", pidPath, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return os.Remove(pidPath)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err == nil && isDemoSWTPM(cmdline, dir) {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		for i := 0; i < 50 && processAlive(pid); i++ {
			time.Sleep(100 * time.Millisecond)
		}
		if processAlive(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if err := os.Remove(pidPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", pidPath, err)
	}
	return nil
}

// isDemoSWTPM reports whether a /proc cmdline is swtpm serving a state in dir.
func isDemoSWTPM(cmdline []byte, dir string) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(args) == 0 || filepath.Base(args[0]) != "swtpm" {
		return false
	}
	for _, a := range args {
		if strings.HasPrefix(a, "dir="+dir+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie (state Z) has exited; its parent has not reaped it yet.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// startTPM manufactures nothing: it starts swtpm on state and opens it with
// package tpm. The returned function closes both and removes the pid file.
func (d *demo) startTPM(ctx context.Context, state *simulator.State, pidFile bool) (*simulator.SWTPM, *tpm.TPM, func(), error) {
	sw, err := simulator.Start(ctx, state)
	if err != nil {
		return nil, nil, nil, err
	}
	pidPath := filepath.Join(d.dir, PIDFile)
	if pidFile {
		if err := os.WriteFile(pidPath, []byte(strconv.Itoa(sw.PID())+"\n"), 0o600); err != nil {
			_ = sw.Stop()
			return nil, nil, nil, fmt.Errorf("writing swtpm pid file: %w", err)
		}
	}
	t, err := tpm.Open(ctx, sw.Address(), tpm.WithLogger(d.cfg.logger))
	if err != nil {
		_ = sw.Stop()
		return nil, nil, nil, err
	}
	stop := func() {
		t.Close()
		_ = sw.Stop()
		if pidFile {
			_ = os.Remove(pidPath)
		}
	}
	return sw, t, stop, nil
}

// rsaEK returns the TPM's RSA-2048 EK, the one every TCG TPM has.
func rsaEK(ctx context.Context, t *tpm.TPM) (tpm.EK, error) {
	eks, err := t.EndorsementKeys(ctx)
	if err != nil {
		return tpm.EK{}, err
	}
	for _, ek := range eks {
		if ek.Algorithm == tpm.AlgRSA2048 {
			return ek, nil
		}
	}
	return tpm.EK{}, errors.New("the TPM has no RSA-2048 EK")
}

// attest manufactures a TPM, attests it and keeps its certified key. The
// TPM runs until the returned function is called.
func (d *demo) attest(ctx context.Context) (_ *simulator.CA, _ func(), err error) {
	p := d.p
	p.section("Software TPM (swtpm, EK certificates from a private swtpm-localca)")
	ca, err := simulator.NewCA(ctx, filepath.Join(d.dir, caDir))
	if err != nil {
		return nil, nil, fmt.Errorf("creating the swtpm CA: %w", err)
	}
	p.info("private manufacturer CA", "root %q, intermediate %q", ca.Root().Subject.CommonName, ca.Intermediate().Subject.CommonName)
	p.more("%s", ca.RootPath())
	state, err := ca.Manufacture(ctx, filepath.Join(d.dir, stateDir))
	if err != nil {
		return nil, nil, fmt.Errorf("manufacturing the TPM: %w", err)
	}
	p.info("manufactured TPM", "%s", state.Dir)
	sw, t, stop, err := d.startTPM(ctx, state, true)
	if err != nil {
		return nil, nil, fmt.Errorf("starting the TPM: %w", err)
	}
	defer func() {
		if err != nil {
			stop()
		}
	}()
	info, err := t.Info(ctx)
	if err != nil {
		return nil, nil, err
	}
	p.info("swtpm running", "%s (pid %d), manufacturer %s, vendor %q", sw.Address(), sw.PID(), info.Manufacturer, info.VendorInfo)

	p.section("Attestation: package tpm (agent) against package tpm/verifier (server)")
	v, err := verifier.New(verifier.Config{
		EKRoots:         []*x509.Certificate{ca.Root()},
		EKIntermediates: []*x509.Certificate{ca.Intermediate()},
	}, verifier.WithLogger(d.cfg.logger))
	if err != nil {
		return nil, nil, fmt.Errorf("creating the verifier: %w", err)
	}
	ek, err := rsaEK(ctx, t)
	if err != nil {
		return nil, nil, err
	}
	ak, err := t.NewAK(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer ak.Close()

	// Round trip 1: identity → credential challenge → activation proof.
	s, ch, err := v.Begin(ctx, ak.Identity(ek))
	if err != nil {
		return nil, nil, fmt.Errorf("verifier refused the EK or AK: %w", err)
	}
	proof, err := ak.ActivateCredential(ctx, ek, ch)
	if err != nil {
		return nil, nil, err
	}
	nonce, err := s.Activate(ctx, proof)
	if err != nil {
		return nil, nil, fmt.Errorf("verifier refused the activation: %w", err)
	}
	// Round trip 2: nonce → quote, PCRs, certified key → result.
	sel := tpm.PCRSelection{Alg: "sha256", PCRs: v.PCRs()}
	ev, key, err := ak.Attest(ctx, nonce, sel)
	if err != nil {
		return nil, nil, err
	}
	res, err := s.Finish(ctx, ev, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("verifier refused the platform evidence: %w", err)
	}
	d.result, d.agentKey = res, key

	if err = d.printEK(ca, ek, res); err != nil {
		return nil, nil, err
	}
	if err = d.printAK(ak, len(proof.Secret)); err != nil {
		return nil, nil, err
	}
	if err = d.printQuote(ev, nonce, sel, res); err != nil {
		return nil, nil, err
	}
	if err = d.printKey(key, res); err != nil {
		return nil, nil, err
	}
	p.info("node selectors", "%s", strings.Join(res.Selectors(), "\n"+strings.Repeat(" ", 5+nameWidth+1)))

	// Re-attest after a clean reboot, against the stored clock.
	if err = sw.Reboot(ctx); err != nil {
		return nil, nil, err
	}
	again, err := d.reattest(ctx, t, v, ek, &res.Clock)
	if err != nil {
		return nil, nil, fmt.Errorf("re-attestation after a reboot: %w", err)
	}
	if again.Clock.ResetCount != res.Clock.ResetCount+1 || again.EKHash != res.EKHash {
		return nil, nil, fmt.Errorf("re-attestation after a reboot: resetCount %d → %d, want +1", res.Clock.ResetCount, again.Clock.ResetCount)
	}
	p.ok(Checks[8], "resetCount %d → %d, accepted against the clock stored from the first attestation",
		res.Clock.ResetCount, again.Clock.ResetCount)

	// The agent keeps its key as a TPM-wrapped blob.
	if err = writeFile(filepath.Join(d.dir, certsDir, "agent-key.tpm"), key.Marshal()); err != nil {
		return nil, nil, err
	}
	return ca, stop, nil
}

// reattest runs the whole protocol again with a new AK.
func (d *demo) reattest(ctx context.Context, t *tpm.TPM, v *verifier.Verifier, ek tpm.EK, prev *verifier.ClockInfo) (*verifier.Result, error) {
	ak, err := t.NewAK(ctx)
	if err != nil {
		return nil, err
	}
	defer ak.Close()
	s, ch, err := v.Begin(ctx, ak.Identity(ek))
	if err != nil {
		return nil, err
	}
	proof, err := ak.ActivateCredential(ctx, ek, ch)
	if err != nil {
		return nil, err
	}
	nonce, err := s.Activate(ctx, proof)
	if err != nil {
		return nil, err
	}
	ev, key, err := ak.Attest(ctx, nonce, tpm.PCRSelection{Alg: "sha256", PCRs: v.PCRs()})
	if err != nil {
		return nil, err
	}
	key.Close()
	return s.Finish(ctx, ev, prev)
}

func (d *demo) printEK(ca *simulator.CA, ek tpm.EK, res *verifier.Result) error {
	chain := res.EKChain
	if len(chain) != 3 || !chain[1].Equal(ca.Intermediate()) || !chain[2].Equal(ca.Root()) {
		return fmt.Errorf("EK chain is not EK → intermediate → private root (%d certificates)", len(chain))
	}
	d.p.ok(Checks[0], "%s EK certificate (serial %s, TCG manufacturer %s)", ek.Algorithm, chain[0].SerialNumber, res.Manufacturer)
	d.p.more("→ %s → %s (private root)", subject(chain[1]), subject(chain[2]))
	hash, err := ek.Hash()
	if err != nil {
		return err
	}
	if hash != res.EKHash {
		return fmt.Errorf("EK hash: agent computed %s, verifier %s", hash, res.EKHash)
	}
	id, err := spiffeid.FromSegments(d.td, "ironroot", "agent", "tpm", res.EKHash)
	if err != nil {
		return fmt.Errorf("agent ID: %w", err)
	}
	d.agentID = id
	d.p.ok(Checks[1], "EK hash (SHA-256 of the EK's PKIX DER) %s, same on both sides", res.EKHash)
	d.p.more("%s", id)
	return nil
}

func (d *demo) printAK(ak *tpm.AK, secretLen int) error {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ak.AttestationParameters().Public)
	if err != nil {
		return fmt.Errorf("decoding AK public area: %w", err)
	}
	a := pub.ObjectAttributes
	if !a.Restricted || !a.SignEncrypt || a.Decrypt || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return fmt.Errorf("AK attributes %+v", a)
	}
	d.p.ok(Checks[2], "ECDSA P-256, restricted signing key, fixedTPM, fixedParent, sensitiveDataOrigin;")
	d.p.more("creation certified by TPM2_CertifyCreation (TPM_GENERATED), parent in the endorsement hierarchy")
	d.p.ok(Checks[3], "the TPM recovered the %d-byte secret bound to this EK and the AK's name (constant-time compare)", secretLen)
	return nil
}

func (d *demo) printQuote(ev tpm.PlatformEvidence, nonce []byte, sel tpm.PCRSelection, res *verifier.Result) error {
	attest, err := tpm2.Unmarshal[tpm2.TPMSAttest](ev.Quote.Attest)
	if err != nil {
		return fmt.Errorf("decoding quote: %w", err)
	}
	if !bytes.Equal(attest.ExtraData.Buffer, nonce) {
		return errors.New("quote does not carry the server's nonce")
	}
	d.p.ok(Checks[4], "signed by the AK over the server's single-use %d-byte nonce %s…", len(nonce), hex.EncodeToString(nonce[:8]))
	d.p.more("selection %s PCRs %s, exactly as the server asked", sel.Alg, intRange(sel.PCRs))
	if len(res.PCRs) != len(sel.PCRs) {
		return fmt.Errorf("verifier returned %d PCRs, quoted %d", len(res.PCRs), len(sel.PCRs))
	}
	d.p.ok(Checks[5], "%d values match the quoted digest, e.g. PCR0=%s…", len(res.PCRs), hex.EncodeToString(res.PCRs[0])[:16])
	c := res.Clock
	if !c.Safe || c.Obfuscated {
		return fmt.Errorf("clock info %+v: want safe and not obfuscated", c)
	}
	d.p.ok(Checks[6], "clock %d ms, resetCount %d, restartCount %d, safe; real counters (not obfuscated)", c.Clock, c.ResetCount, c.RestartCount)
	return nil
}

func (d *demo) printKey(key *tpm.Key, res *verifier.Result) error {
	pub, ok := res.AgentKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return errors.New("the verifier's certified key is not the agent's TPM key")
	}
	d.p.ok(Checks[7], "ECDSA P-256 created inside the TPM, TPM2_Certify by the AK over the same nonce")
	d.p.more("public key SHA-256 %s", keyFingerprint(pub))
	return nil
}

// sign makes a SoftHSM token and a CA key on it, and issues a certificate
// for the TPM key.
func (d *demo) sign(ctx context.Context) error {
	p := d.p
	p.section("HSM (SoftHSM2 through PKCS#11, package hsm)")
	soft, err := simulator.NewSoftHSM(filepath.Join(d.dir, hsmDir))
	if err != nil {
		return err
	}
	// SoftHSM reads its configuration path at C_Initialize (hsm.Open).
	if err := os.Setenv(simulator.SoftHSMConfEnv, soft.ConfPath()); err != nil {
		return fmt.Errorf("setting %s: %w", simulator.SoftHSMConfEnv, err)
	}
	tok, err := soft.InitToken(ctx, tokenLabel, "")
	if err != nil {
		return err
	}
	p.info("token", "%s", tok.URI)
	p.more("(%s=%s; the PIN is only in the 0600 pin-source file)", simulator.SoftHSMConfEnv, soft.ConfPath())
	h, err := hsm.Open(ctx, tok.URI, hsm.WithLogger(d.cfg.logger))
	if err != nil {
		return fmt.Errorf("opening the SoftHSM token: %w", err)
	}
	defer h.Close()
	caKey, err := h.GenerateKey(ctx, hsm.ECP256, hsmKeyLabel)
	if err != nil {
		return err
	}
	p.info("CA key generated on the token", "%s", caKey.URI())
	attrs, err := caKey.Attributes(ctx)
	if err != nil {
		return err
	}
	if err := attrs.HardwareBound(); err != nil {
		return err
	}
	if !attrs.Sign || attrs.Decrypt || attrs.Unwrap || attrs.Derive {
		return fmt.Errorf("HSM key is not sign-only: %+v", attrs)
	}
	p.ok(Checks[9], "CKA_SENSITIVE, CKA_ALWAYS_SENSITIVE, CKA_EXTRACTABLE=false, CKA_NEVER_EXTRACTABLE,")
	p.more("CKA_LOCAL (generated on the token), sign only")

	caCert, err := d.caCertificate(caKey)
	if err != nil {
		return err
	}
	// The agent proves possession of its TPM key with a CSR the TPM signs.
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{d.agentID.URL()},
	}, d.agentKey)
	if err != nil {
		return fmt.Errorf("signing a CSR with the TPM key: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return fmt.Errorf("parsing the CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("CSR signature: %w", err)
	}
	if certified, ok := d.result.AgentKey.(*ecdsa.PublicKey); !ok || !certified.Equal(csr.PublicKey) {
		return errors.New("the CSR's key is not the certified TPM key")
	}
	p.ok(Checks[10], "ECDSA-SHA256 by the TPM key; its key is the one the AK certified")

	leaf, err := d.agentCertificate(caKey, caCert, csr)
	if err != nil {
		return err
	}
	p.ok(Checks[11], "X.509 for the TPM key, URI SAN %s, issued by %q", d.agentID, caCert.Subject.CommonName)
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("verifying the agent certificate: %w", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != d.agentID.String() {
		return fmt.Errorf("agent certificate URI SAN %v", leaf.URIs)
	}
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(d.agentKey.Public()) {
		return errors.New("agent certificate key is not the TPM key")
	}
	p.ok(Checks[12], "chains to the HSM CA certificate; URI SAN is the agent ID; subject key is the TPM key")
	p.more("%s", filepath.Join(d.dir, certsDir, "agent.pem"))
	return nil
}

func (d *demo) caCertificate(key crypto.Signer) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "Ironroot demo CA (key in SoftHSM)", Organization: []string{"Ironroot demo"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(certLifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{d.td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-signing the CA certificate with the HSM key: %w", err)
	}
	if err := writePEM(filepath.Join(d.dir, certsDir, "hsm-ca.pem"), der); err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (d *demo) agentCertificate(key crypto.Signer, ca *x509.Certificate, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(certLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:         []*url.URL{d.agentID.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, csr.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("signing the agent certificate with the HSM key: %w", err)
	}
	if err := writePEM(filepath.Join(d.dir, certsDir, "agent.pem"), der); err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// refuseForeign manufactures a TPM under another CA and shows the verifier
// (which trusts only the first CA) refusing it.
func (d *demo) refuseForeign(ctx context.Context, trusted *simulator.CA) error {
	p := d.p
	p.section("Negative: a TPM from another manufacturer")
	ca, err := simulator.NewCA(ctx, filepath.Join(d.dir, foreignDir, caDir))
	if err != nil {
		return fmt.Errorf("creating the second swtpm CA: %w", err)
	}
	state, err := ca.Manufacture(ctx, filepath.Join(d.dir, foreignDir, stateDir))
	if err != nil {
		return fmt.Errorf("manufacturing the second TPM: %w", err)
	}
	_, t, stop, err := d.startTPM(ctx, state, true)
	if err != nil {
		return fmt.Errorf("starting the second TPM: %w", err)
	}
	defer stop()
	p.info("second TPM", "EK certificates from another private CA (%s)", ca.RootPath())
	v, err := verifier.New(verifier.Config{
		EKRoots:         []*x509.Certificate{trusted.Root()},
		EKIntermediates: []*x509.Certificate{trusted.Intermediate()},
	}, verifier.WithLogger(d.cfg.logger))
	if err != nil {
		return err
	}
	ek, err := rsaEK(ctx, t)
	if err != nil {
		return err
	}
	ak, err := t.NewAK(ctx)
	if err != nil {
		return err
	}
	defer ak.Close()
	_, _, err = v.Begin(ctx, ak.Identity(ek))
	if !errors.Is(err, verifier.ErrEKUntrusted) {
		return fmt.Errorf("the verifier did not refuse a TPM of another manufacturer as untrusted: %v", err)
	}
	p.ok(Checks[13], "refused at Begin, before any challenge:")
	p.more("%v", err)
	return nil
}

func subject(c *x509.Certificate) string {
	if s := c.Subject.String(); s != "" {
		return s
	}
	return "(empty subject)"
}

func keyFingerprint(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "?"
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// intRange prints sorted indices compactly: 0–7, or 0,2,4.
func intRange(idx []int) string {
	contiguous := len(idx) > 1
	for i := 1; i < len(idx); i++ {
		if idx[i] != idx[i-1]+1 {
			contiguous = false
		}
	}
	if contiguous {
		return fmt.Sprintf("%d–%d", idx[0], idx[len(idx)-1])
	}
	s := make([]string, len(idx))
	for i, n := range idx {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

func randomSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating a serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func writePEM(path string, der []byte) error {
	return writeFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func writeFile(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
