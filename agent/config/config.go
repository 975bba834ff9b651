// Package config reads ironroot-agent's configuration: an HCL file shaped
// like SPIRE's agent.conf, with every key also settable by a command-line
// flag. Unknown keys and bad values stop start-up with a message naming the
// key.
package config

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/token"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults for keys the operator leaves out.
const (
	DefaultTrustDomain = "example.org"
	DefaultTPM         = "/dev/tpmrm0"
	DefaultSocketPath  = "/tmp/ironroot-agent/public/api.sock"
	DefaultDataDir     = "./.agent-data"
	DefaultLogLevel    = "info"
	DefaultLogFormat   = "text"
)

// Config is the agent configuration after defaults and flags are applied.
type Config struct {
	// ServerAddress is the server's agent API, host:port.
	ServerAddress string
	// TPM is the TPM address: a device path, unix:///path or tcp://host:port.
	TPM string
	// EventLogPath overrides where the measured-boot log is read from.
	EventLogPath string
	// SocketPath is the Workload API unix socket.
	SocketPath string
	// DataDir keeps the TPM-wrapped key blob and the agent SVID.
	DataDir string
	// TrustDomain is the trust domain.
	TrustDomain spiffeid.TrustDomain
	// TrustBundlePath is the PEM bundle that authenticates the server on
	// first contact.
	TrustBundlePath string
	// LogLevel and LogFormat configure log/slog.
	LogLevel  string
	LogFormat string
}

// Flags are the command-line overrides of `ironroot-agent run`.
type Flags struct {
	ConfigPath    string
	ServerAddress string
	TPM           string
	EventLogPath  string
	SocketPath    string
	DataDir       string
	TrustDomain   string
	TrustBundle   string
	LogLevel      string
	LogFormat     string
}

// RegisterFlags adds the run flags to fs.
func (f *Flags) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&f.ConfigPath, "config", "", "path to the HCL configuration file")
	fs.StringVar(&f.ServerAddress, "serverAddress", "", "server agent API host:port (agent.server_address)")
	fs.StringVar(&f.TPM, "tpm", "", "TPM address: device path, unix:///path or tcp://host:port (agent.tpm, default "+DefaultTPM+")")
	fs.StringVar(&f.EventLogPath, "eventLog", "", "measured-boot event log path (agent.event_log_path)")
	fs.StringVar(&f.SocketPath, "socketPath", "", "Workload API socket (agent.socket_path, default "+DefaultSocketPath+")")
	fs.StringVar(&f.DataDir, "dataDir", "", "data directory (agent.data_dir, default "+DefaultDataDir+")")
	fs.StringVar(&f.TrustDomain, "trustDomain", "", "trust domain (agent.trust_domain, default "+DefaultTrustDomain+")")
	fs.StringVar(&f.TrustBundle, "trustBundle", "", "PEM bundle that authenticates the server (agent.trust_bundle_path)")
	fs.StringVar(&f.LogLevel, "logLevel", "", "debug, info, warn or error (agent.log_level, default "+DefaultLogLevel+")")
	fs.StringVar(&f.LogFormat, "logFormat", "", "text or json (agent.log_format, default "+DefaultLogFormat+")")
}

type unused = map[string][]token.Pos

type file struct {
	Agent  *agentBlock `hcl:"agent"`
	Unused unused      `hcl:",unusedKeyPositions"`
}

type agentBlock struct {
	ServerAddress   *string `hcl:"server_address"`
	TPM             *string `hcl:"tpm"`
	EventLogPath    *string `hcl:"event_log_path"`
	SocketPath      *string `hcl:"socket_path"`
	DataDir         *string `hcl:"data_dir"`
	TrustDomain     *string `hcl:"trust_domain"`
	TrustBundlePath *string `hcl:"trust_bundle_path"`
	LogLevel        *string `hcl:"log_level"`
	LogFormat       *string `hcl:"log_format"`
	Unused          unused  `hcl:",unusedKeyPositions"`
}

// Load reads the file flags.ConfigPath names (if any), applies the flags and
// defaults, and validates the result.
func Load(flags Flags) (*Config, error) {
	var data []byte
	if flags.ConfigPath != "" {
		var err error
		if data, err = os.ReadFile(flags.ConfigPath); err != nil {
			return nil, fmt.Errorf("reading configuration: %w", err)
		}
	}
	return Parse(data, flags)
}

// Parse is Load for an in-memory HCL document.
func Parse(data []byte, flags Flags) (*Config, error) {
	var f file
	if strings.TrimSpace(string(data)) != "" {
		if err := hcl.Decode(&f, string(data)); err != nil {
			return nil, fmt.Errorf("parsing configuration: %w", err)
		}
	}
	var unknown []string
	for k, pos := range f.Unused {
		unknown = append(unknown, keyAt(k, pos))
	}
	a := f.Agent
	if a == nil {
		a = &agentBlock{}
	}
	for k, pos := range a.Unused {
		unknown = append(unknown, keyAt("agent."+k, pos))
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("unknown configuration key(s): %s", strings.Join(unknown, ", "))
	}
	pick := func(flag string, file *string, def string) string {
		switch {
		case flag != "":
			return flag
		case file != nil:
			return *file
		}
		return def
	}
	c := &Config{
		ServerAddress:   pick(flags.ServerAddress, a.ServerAddress, ""),
		TPM:             pick(flags.TPM, a.TPM, DefaultTPM),
		EventLogPath:    pick(flags.EventLogPath, a.EventLogPath, ""),
		SocketPath:      pick(flags.SocketPath, a.SocketPath, DefaultSocketPath),
		DataDir:         pick(flags.DataDir, a.DataDir, DefaultDataDir),
		TrustBundlePath: pick(flags.TrustBundle, a.TrustBundlePath, ""),
		LogLevel:        strings.ToLower(pick(flags.LogLevel, a.LogLevel, DefaultLogLevel)),
		LogFormat:       strings.ToLower(pick(flags.LogFormat, a.LogFormat, DefaultLogFormat)),
	}
	td, err := spiffeid.TrustDomainFromString(pick(flags.TrustDomain, a.TrustDomain, DefaultTrustDomain))
	if err != nil {
		return nil, fmt.Errorf("agent.trust_domain: %w", err)
	}
	c.TrustDomain = td
	if c.ServerAddress == "" {
		return nil, errors.New("agent.server_address: required (flag -serverAddress host:port)")
	}
	if _, port, err := net.SplitHostPort(c.ServerAddress); err != nil || port == "" {
		return nil, fmt.Errorf("agent.server_address: %q is not host:port", c.ServerAddress)
	}
	if err := checkTPMAddress(c.TPM); err != nil {
		return nil, fmt.Errorf("agent.tpm: %w", err)
	}
	if c.TrustBundlePath == "" {
		return nil, errors.New("agent.trust_bundle_path: required to authenticate the server (flag -trustBundle bundle.pem)")
	}
	if _, err := os.Stat(c.TrustBundlePath); err != nil {
		return nil, fmt.Errorf("agent.trust_bundle_path: %w", err)
	}
	if !filepath.IsAbs(c.SocketPath) {
		abs, err := filepath.Abs(c.SocketPath)
		if err != nil {
			return nil, fmt.Errorf("agent.socket_path: %w", err)
		}
		c.SocketPath = abs
	}
	if c.DataDir == "" {
		return nil, errors.New("agent.data_dir: must not be empty")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return nil, fmt.Errorf("agent.log_level: %q is not one of debug, info, warn, error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return nil, fmt.Errorf("agent.log_format: %q is not one of text, json", c.LogFormat)
	}
	return c, nil
}

func keyAt(k string, pos []token.Pos) string {
	if len(pos) > 0 {
		return fmt.Sprintf("%s (line %d)", k, pos[0].Line)
	}
	return k
}

// checkTPMAddress accepts the address forms the tpm package opens.
func checkTPMAddress(a string) error {
	switch {
	case a == "":
		return errors.New("must not be empty")
	case strings.HasPrefix(a, "unix://"):
		if p := strings.TrimPrefix(a, "unix://"); !filepath.IsAbs(p) {
			return fmt.Errorf("%q: want unix:///absolute/path", a)
		}
	case strings.HasPrefix(a, "tcp://"):
		if _, _, err := net.SplitHostPort(strings.TrimPrefix(a, "tcp://")); err != nil {
			return fmt.Errorf("%q: want tcp://host:port", a)
		}
	case strings.Contains(a, "://"):
		return fmt.Errorf("%q: unknown scheme (want a device path, unix:// or tcp://)", a)
	case !filepath.IsAbs(a):
		return fmt.Errorf("%q: a device path must be absolute", a)
	}
	return nil
}
