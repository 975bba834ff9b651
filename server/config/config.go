// Package config reads ironroot-server's configuration: an HCL file shaped
// like SPIRE's server.conf, with every top-level server key also settable by
// a command-line flag. Unknown keys and bad values are refused with a message
// naming the key, so a typo never silently falls back to a default.
package config

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/token"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults for keys the operator leaves out.
const (
	DefaultTrustDomain    = "example.org"
	DefaultBindAddress    = "0.0.0.0"
	DefaultServerPort     = 8081
	DefaultSocketPath     = "/tmp/ironroot-server/private/api.sock"
	DefaultDataDir        = "./.data"
	DefaultLogLevel       = "info"
	DefaultLogFormat      = "text"
	DefaultCATTL          = 24 * time.Hour
	DefaultX509SVIDTTL    = time.Hour
	DefaultJWTSVIDTTL     = 5 * time.Minute
	DefaultCAKeyType      = "ec-p256"
	DefaultJWTKeyType     = "ec-p256"
	DefaultHealthAddress  = "127.0.0.1"
	DefaultHealthPort     = 8080
	DefaultAttestPerIPSec = 1.0
	DefaultAttestStep     = 30 * time.Second
)

// DefaultPCRs is the sha256 PCR selection quoted when none is configured:
// the firmware and boot-loader measurements (PCR 0–7).
var defaultPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// Config is the server configuration after defaults and flags are applied.
type Config struct {
	// TrustDomain is the trust domain the server is the CA of.
	TrustDomain spiffeid.TrustDomain
	// BindAddress and ServerPort are where the agent API listens (TLS).
	BindAddress string
	ServerPort  int
	// SocketPath is the admin API's unix socket; its directory is made 0700.
	SocketPath string
	// DataDir holds the SQLite store.
	DataDir string
	// LogLevel is debug, info, warn or error; LogFormat is text or json.
	LogLevel  string
	LogFormat string

	// CATTL is the lifetime of each X.509 CA certificate and JWT key.
	CATTL time.Duration
	// DefaultX509SVIDTTL and DefaultJWTSVIDTTL apply to entries without a TTL.
	DefaultX509SVIDTTL time.Duration
	DefaultJWTSVIDTTL  time.Duration
	// AgentTTL is the agent SVID lifetime (default: DefaultX509SVIDTTL).
	AgentTTL time.Duration
	// CAKeyType and JWTKeyType: ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096.
	CAKeyType  string
	JWTKeyType string
	// CASubject overrides the CA certificate subject (C=US, O=SPIFFE by default).
	CASubjectCountry      string
	CASubjectOrganization string

	// HSM is the pkcs11: URI of the token holding the CA and JWT keys.
	HSM string

	// Upstream, when set, makes the CA an intermediate under an operator CA
	// whose key is on a PKCS#11 token.
	Upstream *Upstream

	// NodeAttestation is the TPM node policy.
	NodeAttestation TPMPolicy

	// Health is the HTTP /live and /ready listener.
	Health Health

	// AttestRatePerIP bounds attestation attempts per source IP per second.
	AttestRatePerIP float64
	// AttestStepTimeout bounds each round trip of the attestation protocol,
	// so a stalled agent cannot hold a session open.
	AttestStepTimeout time.Duration
}

// Upstream is an operator-supplied upstream CA.
type Upstream struct {
	// CertificatePath is the PEM upstream CA certificate, optionally followed
	// by its chain up to the root.
	CertificatePath string
	// KeyURI is the pkcs11: URI of the upstream CA key.
	KeyURI string
}

// TPMPolicy is the node attestation policy.
type TPMPolicy struct {
	// EKRootDir holds PEM/DER manufacturer root and intermediate certificates.
	EKRootDir string
	// EKHashAllowList is a file of allowed EK public-key hashes.
	EKHashAllowList string
	// RequireEKCertificate refuses TPMs without an EK certificate.
	RequireEKCertificate bool
	// PCRs is the sha256 PCR selection every quote must cover exactly.
	PCRs []int
	// RequiredPCRs are values a node's PCRs must have.
	RequiredPCRs map[int][]byte
}

// Health configures the HTTP health listener.
type Health struct {
	Enabled     bool
	BindAddress string
	BindPort    int
	LivePath    string
	ReadyPath   string
}

// unused collects keys HCL found but no field took, with their positions.
type unused = map[string][]token.Pos

// file is the HCL document's shape. Pointers tell "unset" from zero so that
// defaults and flags compose.
type file struct {
	Server          *serverBlock          `hcl:"server"`
	NodeAttestation *nodeAttestationBlock `hcl:"node_attestation"`
	HealthChecks    *healthBlock          `hcl:"health_checks"`
	Unused          unused                `hcl:",unusedKeyPositions"`
}

type serverBlock struct {
	TrustDomain           *string  `hcl:"trust_domain"`
	BindAddress           *string  `hcl:"bind_address"`
	BindPort              *int     `hcl:"bind_port"`
	SocketPath            *string  `hcl:"socket_path"`
	DataDir               *string  `hcl:"data_dir"`
	LogLevel              *string  `hcl:"log_level"`
	LogFormat             *string  `hcl:"log_format"`
	CATTL                 *string  `hcl:"ca_ttl"`
	DefaultX509SVIDTTL    *string  `hcl:"default_x509_svid_ttl"`
	DefaultJWTSVIDTTL     *string  `hcl:"default_jwt_svid_ttl"`
	AgentTTL              *string  `hcl:"agent_ttl"`
	CAKeyType             *string  `hcl:"ca_key_type"`
	JWTKeyType            *string  `hcl:"jwt_key_type"`
	CASubjectCountry      *string  `hcl:"ca_subject_country"`
	CASubjectOrganization *string  `hcl:"ca_subject_organization"`
	HSM                   *string  `hcl:"hsm"`
	AttestRatePerIP       *float64 `hcl:"attest_rate_per_ip"`
	AttestStepTimeout     *string  `hcl:"attest_step_timeout"`
	UpstreamCertificate   *string  `hcl:"upstream_ca_certificate"`
	UpstreamKey           *string  `hcl:"upstream_ca_key"`
	Unused                unused   `hcl:",unusedKeyPositions"`
}

type nodeAttestationBlock struct {
	TPM    *tpmBlock `hcl:"tpm"`
	Unused unused    `hcl:",unusedKeyPositions"`
}

type tpmBlock struct {
	EKRootDir            *string           `hcl:"ek_root_dir"`
	EKHashAllowList      *string           `hcl:"ek_hash_allow_list"`
	RequireEKCertificate *bool             `hcl:"require_ek_certificate"`
	PCRs                 []int             `hcl:"pcrs"`
	RequiredPCRs         map[string]string `hcl:"required_pcrs"`
	Unused               unused            `hcl:",unusedKeyPositions"`
}

type healthBlock struct {
	ListenerEnabled *bool   `hcl:"listener_enabled"`
	BindAddress     *string `hcl:"bind_address"`
	BindPort        *int    `hcl:"bind_port"`
	LivePath        *string `hcl:"live_path"`
	ReadyPath       *string `hcl:"ready_path"`
	Unused          unused  `hcl:",unusedKeyPositions"`
}

// Flags are the command-line overrides of `ironroot-server run`. Register
// them with RegisterFlags; an unset flag leaves the file's value alone.
type Flags struct {
	ConfigPath  string
	BindAddress string
	ServerPort  string
	SocketPath  string
	TrustDomain string
	DataDir     string
	LogLevel    string
	LogFormat   string
	HSM         string
}

// RegisterFlags adds the run flags to fs.
func (f *Flags) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&f.ConfigPath, "config", "", "path to the HCL configuration file")
	fs.StringVar(&f.BindAddress, "bindAddress", "", "IP address the agent API listens on (server.bind_address, default "+DefaultBindAddress+")")
	fs.StringVar(&f.ServerPort, "serverPort", "", "port of the agent API (server.bind_port, default "+strconv.Itoa(DefaultServerPort)+")")
	fs.StringVar(&f.SocketPath, "socketPath", "", "admin API unix socket (server.socket_path, default "+DefaultSocketPath+")")
	fs.StringVar(&f.TrustDomain, "trustDomain", "", "trust domain (server.trust_domain, default "+DefaultTrustDomain+")")
	fs.StringVar(&f.DataDir, "dataDir", "", "data directory (server.data_dir, default "+DefaultDataDir+")")
	fs.StringVar(&f.LogLevel, "logLevel", "", "debug, info, warn or error (server.log_level, default "+DefaultLogLevel+")")
	fs.StringVar(&f.LogFormat, "logFormat", "", "text or json (server.log_format, default "+DefaultLogFormat+")")
	fs.StringVar(&f.HSM, "hsm", "", "pkcs11: URI of the CA key token (server.hsm)")
}

// Load reads the file named by flags.ConfigPath (if any), applies the flags
// over it and the defaults under it, and validates the result.
func Load(flags Flags) (*Config, error) {
	var data []byte
	if flags.ConfigPath != "" {
		var err error
		data, err = os.ReadFile(flags.ConfigPath)
		if err != nil {
			return nil, fmt.Errorf("reading configuration: %w", err)
		}
	}
	return Parse(data, flags)
}

// Parse is Load for an in-memory HCL document.
func Parse(data []byte, flags Flags) (*Config, error) {
	var f file
	if len(strings.TrimSpace(string(data))) > 0 {
		if err := hcl.Decode(&f, string(data)); err != nil {
			return nil, fmt.Errorf("parsing configuration: %w", err)
		}
	}
	if err := unknownKeys(&f); err != nil {
		return nil, err
	}
	if f.Server == nil {
		f.Server = &serverBlock{}
	}
	if err := applyFlags(f.Server, flags); err != nil {
		return nil, err
	}
	return build(&f)
}

func unknownKeys(f *file) error {
	var unknown []string
	add := func(prefix string, keys unused) {
		for k, pos := range keys {
			if len(pos) > 0 {
				unknown = append(unknown, fmt.Sprintf("%s%s (line %d)", prefix, k, pos[0].Line))
				continue
			}
			unknown = append(unknown, prefix+k)
		}
	}
	add("", f.Unused)
	if f.Server != nil {
		add("server.", f.Server.Unused)
	}
	if f.NodeAttestation != nil {
		add("node_attestation.", f.NodeAttestation.Unused)
		if f.NodeAttestation.TPM != nil {
			add("node_attestation.tpm.", f.NodeAttestation.TPM.Unused)
		}
	}
	if f.HealthChecks != nil {
		add("health_checks.", f.HealthChecks.Unused)
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fmt.Errorf("unknown configuration key(s): %s", strings.Join(unknown, ", "))
	}
	return nil
}

func applyFlags(s *serverBlock, fl Flags) error {
	set := func(dst **string, v string) {
		if v != "" {
			*dst = &v
		}
	}
	set(&s.BindAddress, fl.BindAddress)
	set(&s.SocketPath, fl.SocketPath)
	set(&s.TrustDomain, fl.TrustDomain)
	set(&s.DataDir, fl.DataDir)
	set(&s.LogLevel, fl.LogLevel)
	set(&s.LogFormat, fl.LogFormat)
	set(&s.HSM, fl.HSM)
	if fl.ServerPort != "" {
		p, err := strconv.Atoi(fl.ServerPort)
		if err != nil {
			return fmt.Errorf("-serverPort: %q is not a port number", fl.ServerPort)
		}
		s.BindPort = &p
	}
	return nil
}

func build(f *file) (*Config, error) {
	s := f.Server
	c := &Config{
		BindAddress:           str(s.BindAddress, DefaultBindAddress),
		ServerPort:            intv(s.BindPort, DefaultServerPort),
		SocketPath:            str(s.SocketPath, DefaultSocketPath),
		DataDir:               str(s.DataDir, DefaultDataDir),
		LogLevel:              strings.ToLower(str(s.LogLevel, DefaultLogLevel)),
		LogFormat:             strings.ToLower(str(s.LogFormat, DefaultLogFormat)),
		CAKeyType:             strings.ToLower(str(s.CAKeyType, DefaultCAKeyType)),
		JWTKeyType:            strings.ToLower(str(s.JWTKeyType, DefaultJWTKeyType)),
		CASubjectCountry:      str(s.CASubjectCountry, "US"),
		CASubjectOrganization: str(s.CASubjectOrganization, "SPIFFE"),
		HSM:                   str(s.HSM, ""),
		AttestRatePerIP:       DefaultAttestPerIPSec,
	}
	td, err := spiffeid.TrustDomainFromString(str(s.TrustDomain, DefaultTrustDomain))
	if err != nil {
		return nil, fmt.Errorf("server.trust_domain: %w", err)
	}
	c.TrustDomain = td
	if ip := net.ParseIP(c.BindAddress); ip == nil {
		return nil, fmt.Errorf("server.bind_address: %q is not an IP address", c.BindAddress)
	}
	if c.ServerPort < 0 || c.ServerPort > 65535 {
		return nil, fmt.Errorf("server.bind_port: %d is out of range", c.ServerPort)
	}
	if !filepath.IsAbs(c.SocketPath) {
		abs, err := filepath.Abs(c.SocketPath)
		if err != nil {
			return nil, fmt.Errorf("server.socket_path: %w", err)
		}
		c.SocketPath = abs
	}
	if c.DataDir == "" {
		return nil, errors.New("server.data_dir: must not be empty")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return nil, fmt.Errorf("server.log_level: %q is not one of debug, info, warn, error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return nil, fmt.Errorf("server.log_format: %q is not one of text, json", c.LogFormat)
	}
	durations := []struct {
		key string
		v   *string
		def time.Duration
		dst *time.Duration
	}{
		{"server.ca_ttl", s.CATTL, DefaultCATTL, &c.CATTL},
		{"server.default_x509_svid_ttl", s.DefaultX509SVIDTTL, DefaultX509SVIDTTL, &c.DefaultX509SVIDTTL},
		{"server.default_jwt_svid_ttl", s.DefaultJWTSVIDTTL, DefaultJWTSVIDTTL, &c.DefaultJWTSVIDTTL},
		{"server.agent_ttl", s.AgentTTL, 0, &c.AgentTTL},
		{"server.attest_step_timeout", s.AttestStepTimeout, DefaultAttestStep, &c.AttestStepTimeout},
	}
	for _, d := range durations {
		*d.dst = d.def
		if d.v == nil {
			continue
		}
		v, err := time.ParseDuration(*d.v)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("%s: %q is not a positive duration (e.g. 1h, 30m)", d.key, *d.v)
		}
		*d.dst = v
	}
	if c.AgentTTL == 0 {
		c.AgentTTL = c.DefaultX509SVIDTTL
	}
	for key, kt := range map[string]string{"server.ca_key_type": c.CAKeyType, "server.jwt_key_type": c.JWTKeyType} {
		switch kt {
		case "ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096":
		default:
			return nil, fmt.Errorf("%s: %q is not one of ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096", key, kt)
		}
	}
	if c.HSM == "" {
		return nil, errors.New("server.hsm: a pkcs11: URI of the CA key token is required (flag -hsm)")
	}
	if !strings.HasPrefix(c.HSM, "pkcs11:") {
		return nil, errors.New("server.hsm: must be a pkcs11: URI")
	}
	if s.AttestRatePerIP != nil {
		if *s.AttestRatePerIP <= 0 {
			return nil, fmt.Errorf("server.attest_rate_per_ip: %v must be positive", *s.AttestRatePerIP)
		}
		c.AttestRatePerIP = *s.AttestRatePerIP
	}
	switch {
	case s.UpstreamCertificate != nil && s.UpstreamKey != nil:
		c.Upstream = &Upstream{CertificatePath: *s.UpstreamCertificate, KeyURI: *s.UpstreamKey}
		if _, err := os.Stat(c.Upstream.CertificatePath); err != nil {
			return nil, fmt.Errorf("server.upstream_ca_certificate: %w", err)
		}
		if !strings.HasPrefix(c.Upstream.KeyURI, "pkcs11:") {
			return nil, errors.New("server.upstream_ca_key: must be a pkcs11: URI")
		}
	case s.UpstreamCertificate != nil:
		return nil, errors.New("server.upstream_ca_certificate: needs server.upstream_ca_key too")
	case s.UpstreamKey != nil:
		return nil, errors.New("server.upstream_ca_key: needs server.upstream_ca_certificate too")
	}
	if err := buildTPMPolicy(f.NodeAttestation, &c.NodeAttestation); err != nil {
		return nil, err
	}
	if err := buildHealth(f.HealthChecks, &c.Health); err != nil {
		return nil, err
	}
	return c, nil
}

func buildTPMPolicy(b *nodeAttestationBlock, p *TPMPolicy) error {
	p.RequireEKCertificate = true
	p.PCRs = append([]int(nil), defaultPCRs...)
	if b == nil || b.TPM == nil {
		return errors.New("node_attestation.tpm: the block is required (ek_root_dir and/or ek_hash_allow_list)")
	}
	t := b.TPM
	p.EKRootDir = str(t.EKRootDir, "")
	p.EKHashAllowList = str(t.EKHashAllowList, "")
	if t.RequireEKCertificate != nil {
		p.RequireEKCertificate = *t.RequireEKCertificate
	}
	if p.EKRootDir == "" && p.EKHashAllowList == "" {
		return errors.New("node_attestation.tpm: set ek_root_dir, ek_hash_allow_list, or both")
	}
	if p.EKRootDir != "" {
		st, err := os.Stat(p.EKRootDir)
		if err != nil {
			return fmt.Errorf("node_attestation.tpm.ek_root_dir: %w", err)
		}
		if !st.IsDir() {
			return fmt.Errorf("node_attestation.tpm.ek_root_dir: %s is not a directory", p.EKRootDir)
		}
	}
	if p.EKHashAllowList != "" {
		// The file is read on every attestation (fail closed); here only its
		// presence is checked so a typo stops start-up.
		if _, err := os.Stat(p.EKHashAllowList); err != nil {
			return fmt.Errorf("node_attestation.tpm.ek_hash_allow_list: %w", err)
		}
	}
	if p.RequireEKCertificate && p.EKRootDir == "" {
		return errors.New("node_attestation.tpm.require_ek_certificate: true needs ek_root_dir")
	}
	if t.PCRs != nil {
		if len(t.PCRs) == 0 {
			return errors.New("node_attestation.tpm.pcrs: must not be empty")
		}
		seen := map[int]bool{}
		for _, i := range t.PCRs {
			if i < 0 || i > 23 {
				return fmt.Errorf("node_attestation.tpm.pcrs: %d is not a PCR index (0–23)", i)
			}
			if seen[i] {
				return fmt.Errorf("node_attestation.tpm.pcrs: %d listed twice", i)
			}
			seen[i] = true
		}
		p.PCRs = append([]int(nil), t.PCRs...)
		sort.Ints(p.PCRs)
	}
	if len(t.RequiredPCRs) > 0 {
		p.RequiredPCRs = map[int][]byte{}
		for k, v := range t.RequiredPCRs {
			i, err := strconv.Atoi(k)
			if err != nil || i < 0 || i > 23 {
				return fmt.Errorf("node_attestation.tpm.required_pcrs: %q is not a PCR index", k)
			}
			if !contains(p.PCRs, i) {
				return fmt.Errorf("node_attestation.tpm.required_pcrs: PCR %d is not in pcrs, so it is never quoted", i)
			}
			d, err := hex.DecodeString(v)
			if err != nil || len(d) != 32 {
				return fmt.Errorf("node_attestation.tpm.required_pcrs: PCR %d: want 64 hex digits (sha256)", i)
			}
			p.RequiredPCRs[i] = d
		}
	}
	return nil
}

func buildHealth(b *healthBlock, h *Health) error {
	*h = Health{Enabled: false, BindAddress: DefaultHealthAddress, BindPort: DefaultHealthPort, LivePath: "/live", ReadyPath: "/ready"}
	if b == nil {
		return nil
	}
	if b.ListenerEnabled != nil {
		h.Enabled = *b.ListenerEnabled
	}
	h.BindAddress = str(b.BindAddress, h.BindAddress)
	h.BindPort = intv(b.BindPort, h.BindPort)
	h.LivePath = str(b.LivePath, h.LivePath)
	h.ReadyPath = str(b.ReadyPath, h.ReadyPath)
	if net.ParseIP(h.BindAddress) == nil {
		return fmt.Errorf("health_checks.bind_address: %q is not an IP address", h.BindAddress)
	}
	if h.BindPort < 0 || h.BindPort > 65535 {
		return fmt.Errorf("health_checks.bind_port: %d is out of range", h.BindPort)
	}
	for key, p := range map[string]string{"health_checks.live_path": h.LivePath, "health_checks.ready_path": h.ReadyPath} {
		if !strings.HasPrefix(p, "/") {
			return fmt.Errorf("%s: %q must start with /", key, p)
		}
	}
	return nil
}

func str(p *string, def string) string {
	if p == nil {
		return def
	}
	return *p
}

func intv(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
