// Package simulator stands up the software hardware roots every Ironroot test
// and the demo use: swtpm software TPMs manufactured with EK certificates from
// a private swtpm-localca, and SoftHSM2 tokens. Nothing here touches the
// system-wide /etc/swtpm_setup.conf or /var/lib/swtpm-localca.
package simulator

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Tool paths. swtpm-tools installs them in /usr/bin on Debian; exec.LookPath
// is tried first so a custom build on PATH wins.
const (
	swtpmBin      = "swtpm"
	swtpmSetupBin = "swtpm_setup"
	swtpmLocalCA  = "swtpm_localca"
)

// File names inside a CA directory.
const (
	setupConfName   = "swtpm_setup.conf"
	localCAConfName = "swtpm-localca.conf"
	localCAOptsName = "swtpm-localca.options"
	caSubdir        = "ca"
	rootCertName    = "swtpm-localca-rootca-cert.pem"
	issuerCertName  = "issuercert.pem"
)

// CA is a private swtpm-localca: the "manufacturer" that signs the EK
// certificates of the TPMs it manufactures. Two CAs are two manufacturers
// with unrelated roots.
type CA struct {
	dir              string
	root             *x509.Certificate
	intermediate     *x509.Certificate
	rootPath         string
	intermediatePath string
}

// lookTool finds a swtpm tool on PATH or in /usr/bin, with an error that says
// how to install it.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	p := filepath.Join("/usr/bin", name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found: install swtpm and swtpm-tools (make deps)", name)
}

// NewCA writes a private swtpm-localca configuration into dir (created if
// missing) and creates its root and intermediate certificates, so the trust
// anchors exist before the first TPM is manufactured. If dir already holds a
// CA, it is reused.
func NewCA(ctx context.Context, dir string) (*CA, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving CA directory %q: %w", dir, err)
	}
	ca := &CA{
		dir:              abs,
		rootPath:         filepath.Join(abs, caSubdir, rootCertName),
		intermediatePath: filepath.Join(abs, caSubdir, issuerCertName),
	}
	if err := os.MkdirAll(filepath.Join(abs, caSubdir), 0o700); err != nil {
		return nil, fmt.Errorf("creating CA directory: %w", err)
	}
	localca, err := lookTool(swtpmLocalCA)
	if err != nil {
		return nil, err
	}
	files := map[string]string{
		setupConfName: fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
			localca, ca.localCAConf(), filepath.Join(abs, localCAOptsName)),
		localCAConfName: fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n",
			filepath.Join(abs, caSubdir)),
		localCAOptsName: "--platform-manufacturer Ironroot\n--platform-version 2.1\n--platform-model IronrootSim\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(abs, name), []byte(content), 0o600); err != nil {
			return nil, fmt.Errorf("writing %s: %w", name, err)
		}
	}
	if _, err := os.Stat(ca.intermediatePath); errors.Is(err, os.ErrNotExist) {
		if err := ca.bootstrap(ctx, localca); err != nil {
			return nil, err
		}
	}
	if ca.root, err = readCertPEM(ca.rootPath); err != nil {
		return nil, fmt.Errorf("reading swtpm-localca root: %w", err)
	}
	if ca.intermediate, err = readCertPEM(ca.intermediatePath); err != nil {
		return nil, fmt.Errorf("reading swtpm-localca intermediate: %w", err)
	}
	return ca, nil
}

// bootstrap makes swtpm_localca create its root and signing CA: it does so on
// first use, so issue one throwaway EK certificate for a random P-384 key.
func (ca *CA) bootstrap(ctx context.Context, localca string) error {
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating bootstrap key: %w", err)
	}
	out, err := os.MkdirTemp("", "ironroot-localca-")
	if err != nil {
		return fmt.Errorf("creating bootstrap directory: %w", err)
	}
	defer os.RemoveAll(out)
	ek := fmt.Sprintf("x=%096x,y=%096x,id=secp384r1", k.X, k.Y)
	cmd := exec.CommandContext(ctx, localca, "--type", "ek", "--ek", ek, "--dir", out,
		"--tpm-spec-family", "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164",
		"--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm", "--tpm-version", "id:20191023",
		"--tpm2", "--configfile", ca.localCAConf(), "--optsfile", filepath.Join(ca.dir, localCAOptsName))
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("creating swtpm-localca root and intermediate: %w: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

func (ca *CA) localCAConf() string { return filepath.Join(ca.dir, localCAConfName) }

// Dir returns the CA's directory.
func (ca *CA) Dir() string { return ca.dir }

// Root returns the CA's self-signed root certificate (CN=swtpm-localca-rootca).
func (ca *CA) Root() *x509.Certificate { return ca.root }

// Intermediate returns the CA's issuing certificate (CN=swtpm-localca), which
// signs EK certificates and is signed by Root.
func (ca *CA) Intermediate() *x509.Certificate { return ca.intermediate }

// RootPath returns the path of the PEM root certificate.
func (ca *CA) RootPath() string { return ca.rootPath }

// IntermediatePath returns the path of the PEM intermediate certificate.
func (ca *CA) IntermediatePath() string { return ca.intermediatePath }

func readCertPEM(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// State is a manufactured TPM's state directory. Only one swtpm may run on a
// state directory at a time; Clone it to run another copy of the same TPM.
type State struct {
	// Dir is the absolute state directory (swtpm --tpmstate dir=).
	Dir string
	// CA is the CA that signed the EK certificates, nil for a state that
	// was opened rather than manufactured.
	CA *CA
}

type manufactureConfig struct {
	pcrBanks string
}

// ManufactureOption configures Manufacture.
type ManufactureOption func(*manufactureConfig)

// WithPCRBanks sets the active PCR banks, a comma separated list such as
// "sha1,sha256" (default "sha256").
func WithPCRBanks(banks string) ManufactureOption {
	return func(c *manufactureConfig) { c.pcrBanks = banks }
}

// Manufacture creates a TPM 2.0 state in stateDir with an RSA-2048 EK
// (0x81010001, certificate at NV 0x01c00002), an ECC P-384 EK (0x81010016,
// NV 0x01c00016) and a platform certificate, all signed by ca, with the
// NV indices locked as on a real TPM. It takes about a second.
func (ca *CA) Manufacture(ctx context.Context, stateDir string, opts ...ManufactureOption) (*State, error) {
	cfg := manufactureConfig{pcrBanks: "sha256"}
	for _, o := range opts {
		o(&cfg)
	}
	setup, err := lookTool(swtpmSetupBin)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return nil, fmt.Errorf("resolving state directory %q: %w", stateDir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	if _, err := os.Stat(filepath.Join(abs, "tpm2-00.permall")); err == nil {
		return nil, fmt.Errorf("manufacturing TPM: %s already holds a TPM state", abs)
	}
	cmd := exec.CommandContext(ctx, setup, "--tpm2", "--tpmstate", abs,
		"--config", filepath.Join(ca.dir, setupConfName),
		"--create-ek-cert", "--create-platform-cert", "--lock-nvram",
		"--pcr-banks", cfg.pcrBanks)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("manufacturing TPM with swtpm_setup: %w: %s", err, lastLines(out.String(), 5))
	}
	return &State{Dir: abs, CA: ca}, nil
}

// OpenState returns the State for an existing, manufactured state directory.
func OpenState(dir string) (*State, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving state directory %q: %w", dir, err)
	}
	if _, err := os.Stat(filepath.Join(abs, "tpm2-00.permall")); err != nil {
		return nil, fmt.Errorf("opening TPM state: %s holds no manufactured TPM: %w", abs, err)
	}
	return &State{Dir: abs}, nil
}

// Clone copies the state into dir (created if missing), so a test suite
// manufactures once and gives each test its own TPM with the same EKs. The
// clone must not be used while a swtpm runs on the original.
func (s *State) Clone(ctx context.Context, dir string) (*State, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving clone directory %q: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("creating clone directory: %w", err)
	}
	entries, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, fmt.Errorf("reading TPM state: %w", err)
	}
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		// The lock file belongs to whichever swtpm runs on the original.
		if !e.Type().IsRegular() || e.Name() == ".lock" {
			continue
		}
		if err := copyFile(filepath.Join(s.Dir, e.Name()), filepath.Join(abs, e.Name())); err != nil {
			return nil, fmt.Errorf("cloning TPM state: %w", err)
		}
	}
	return &State{Dir: abs, CA: s.CA}, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}
