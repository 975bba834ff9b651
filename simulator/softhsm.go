package simulator

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// SoftHSMConfEnv is the environment variable SoftHSM2 reads its configuration
// path from. SoftHSM reads it once, at C_Initialize, so one process (one test
// binary) uses one configuration and tells its tokens apart by label.
const SoftHSMConfEnv = "SOFTHSM2_CONF"

// softhsmModulePaths returns the places distributions install the SoftHSM2
// PKCS#11 module, Debian/Ubuntu first.
func softhsmModulePaths() []string {
	return []string{
		"/usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib64/softhsm/libsofthsm.so",
		"/usr/lib64/pkcs11/libsofthsm2.so",
		"/usr/lib/pkcs11/libsofthsm2.so",
		"/usr/local/lib/softhsm/libsofthsm2.so",
		"/opt/homebrew/lib/softhsm/libsofthsm2.so",
	}
}

// SoftHSMModulePath returns the path of the SoftHSM2 PKCS#11 module on this
// machine, or an error that says how to install it.
func SoftHSMModulePath() (string, error) {
	for _, p := range softhsmModulePaths() {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", errors.New("SoftHSM2 PKCS#11 module not found (looked in /usr/lib/softhsm, /usr/lib64/softhsm, " +
		"/usr/local/lib/softhsm, /opt/homebrew/lib/softhsm): install softhsm2 (`make deps`)")
}

// softhsmUtil finds softhsm2-util on PATH or in /usr/bin.
func softhsmUtil() (string, error) {
	if p, err := exec.LookPath("softhsm2-util"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/bin/softhsm2-util"); err == nil {
		return "/usr/bin/softhsm2-util", nil
	}
	return "", errors.New("softhsm2-util not found: install softhsm2 (`make deps`)")
}

// SoftHSM is a private SoftHSM2 installation: a softhsm2.conf and a token
// directory under one directory, independent of /etc/softhsm and
// /var/lib/softhsm. Any number of tokens, distinguished by label, live in it.
//
// SoftHSM builds its slot list at C_Initialize: a process that has already
// initialised the module does not see tokens created later by softhsm2-util.
// Such a process (a test binary) prepares its tokens first with
// PrepareTokens and hands them out with TakeToken.
type SoftHSM struct {
	dir        string
	confPath   string
	tokenDir   string
	modulePath string
	util       string

	mu    sync.Mutex
	spare []*SoftHSMToken
	next  int
}

// NewSoftHSM writes a private SoftHSM2 configuration into dir (created if
// missing) with its token directory at dir/tokens. Point SOFTHSM2_CONF at
// ConfPath (see Env) before the PKCS#11 module is initialised in a process.
func NewSoftHSM(dir string) (*SoftHSM, error) {
	mod, err := SoftHSMModulePath()
	if err != nil {
		return nil, err
	}
	util, err := softhsmUtil()
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving SoftHSM directory %q: %w", dir, err)
	}
	tokenDir := filepath.Join(abs, "tokens")
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating SoftHSM token directory: %w", err)
	}
	conf := fmt.Sprintf("# Private SoftHSM2 configuration written by ironroot simulator.\n"+
		"directories.tokendir = %s\n"+
		"objectstore.backend = file\n"+
		"log.level = ERROR\n"+
		"slots.removable = false\n", tokenDir)
	confPath := filepath.Join(abs, "softhsm2.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return nil, fmt.Errorf("writing SoftHSM configuration: %w", err)
	}
	return &SoftHSM{dir: abs, confPath: confPath, tokenDir: tokenDir, modulePath: mod, util: util}, nil
}

// Dir returns the directory holding the configuration, tokens and PIN files.
func (s *SoftHSM) Dir() string { return s.dir }

// ConfPath returns the path of the private softhsm2.conf.
func (s *SoftHSM) ConfPath() string { return s.confPath }

// TokenDir returns the directory SoftHSM keeps its tokens in.
func (s *SoftHSM) TokenDir() string { return s.tokenDir }

// ModulePath returns the path of the SoftHSM2 PKCS#11 module.
func (s *SoftHSM) ModulePath() string { return s.modulePath }

// Env returns the environment assignment (SOFTHSM2_CONF=...) that makes
// SoftHSM use this configuration.
func (s *SoftHSM) Env() string { return SoftHSMConfEnv + "=" + s.confPath }

// SoftHSMToken describes an initialised SoftHSM2 token.
type SoftHSMToken struct {
	// Label is the token label, which the pkcs11: URI selects the token by.
	Label string
	// PIN is the user PIN; it is also stored in PINFile (mode 0600).
	PIN string
	// SOPIN is the security officer PIN.
	SOPIN string
	// PINFile is the absolute path of the file holding PIN.
	PINFile string
	// URI is the RFC 7512 URI of the token, with module-path and a file:
	// pin-source (never the PIN itself).
	URI string
	// ModulePath is the path of the SoftHSM2 PKCS#11 module.
	ModulePath string
	// ConfPath is the softhsm2.conf the token lives under.
	ConfPath string
}

// EnvVar returns the name of the environment variable to set (SOFTHSM2_CONF);
// its value is ConfPath.
func (t *SoftHSMToken) EnvVar() string { return SoftHSMConfEnv }

// InitToken initialises a new token labelled label in the first free slot
// (softhsm2-util --init-token --free). An empty pin gets a random one. The PIN
// is written to a 0600 file beside the configuration. Labels must be unique
// within the SoftHSM and at most 32 bytes long.
//
// softhsm2-util takes the PINs as arguments, so they are briefly visible in
// the process list: fine for test and demo tokens, not for real secrets.
func (s *SoftHSM) InitToken(ctx context.Context, label, pin string) (*SoftHSMToken, error) {
	if label == "" || len(label) > 32 {
		return nil, fmt.Errorf("initialising SoftHSM token: label must be 1 to 32 bytes, got %d", len(label))
	}
	if strings.ContainsAny(label, "\x00\n") {
		return nil, errors.New("initialising SoftHSM token: label contains a NUL or newline")
	}
	if pin == "" {
		p, err := randomPIN()
		if err != nil {
			return nil, err
		}
		pin = p
	}
	if len(pin) < 4 || len(pin) > 255 {
		return nil, errors.New("initialising SoftHSM token: the PIN must be 4 to 255 bytes long")
	}
	soPIN, err := randomPIN()
	if err != nil {
		return nil, err
	}
	pinDir := filepath.Join(s.dir, "pins")
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating PIN directory: %w", err)
	}
	pinFile := filepath.Join(pinDir, hex.EncodeToString([]byte(label))+".pin")
	if _, err := os.Stat(pinFile); err == nil {
		return nil, fmt.Errorf("initialising SoftHSM token %q: a token with this label already exists", label)
	}
	if _, err := s.run(ctx, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", soPIN); err != nil {
		return nil, fmt.Errorf("initialising SoftHSM token %q: %w", label, err)
	}
	if err := os.WriteFile(pinFile, []byte(pin), 0o600); err != nil {
		return nil, fmt.Errorf("writing PIN file for token %q: %w", label, err)
	}
	return &SoftHSMToken{
		Label:      label,
		PIN:        pin,
		SOPIN:      soPIN,
		PINFile:    pinFile,
		URI:        softhsmTokenURI(label, s.modulePath, pinFile),
		ModulePath: s.modulePath,
		ConfPath:   s.confPath,
	}, nil
}

// PrepareTokens initialises n tokens with random PINs and labels
// "prepared-NNN" for TakeToken. Call it before the PKCS#11 module is
// initialised in this process.
func (s *SoftHSM) PrepareTokens(ctx context.Context, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		label := fmt.Sprintf("prepared-%03d", s.next)
		tok, err := s.InitToken(ctx, label, "")
		if err != nil {
			return fmt.Errorf("preparing SoftHSM tokens: %w", err)
		}
		s.next++
		s.spare = append(s.spare, tok)
	}
	return nil
}

// TakeToken hands out a token made by PrepareTokens that was not handed out
// before. It returns an error when none is left.
func (s *SoftHSM) TakeToken() (*SoftHSMToken, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.spare) == 0 {
		return nil, fmt.Errorf("no prepared SoftHSM token left (%d were prepared): prepare more", s.next)
	}
	tok := s.spare[0]
	s.spare = s.spare[1:]
	return tok, nil
}

// ReturnToken gives a token from TakeToken back for reuse. Return only a
// token that is empty again (all objects destroyed) and still has the PIN
// it was handed out with.
func (s *SoftHSM) ReturnToken(tok *SoftHSMToken) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.spare = append(s.spare, tok)
}

// DeleteToken deletes the token labelled label and its PIN file. Close every
// PKCS#11 session on it first: its objects vanish under open handles.
func (s *SoftHSM) DeleteToken(ctx context.Context, label string) error {
	if _, err := s.run(ctx, "--delete-token", "--token", label); err != nil {
		return fmt.Errorf("deleting SoftHSM token %q: %w", label, err)
	}
	pinFile := filepath.Join(s.dir, "pins", hex.EncodeToString([]byte(label))+".pin")
	if err := os.Remove(pinFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing PIN file of token %q: %w", label, err)
	}
	return nil
}

// ImportKey imports a PKCS#8 private key (PEM file at keyPath) into the token
// with softhsm2-util --import. Such a key is not generated on the token
// (CKA_LOCAL false), which is what tests of the import refusal need. id is
// the CKA_ID in hex.
func (s *SoftHSM) ImportKey(ctx context.Context, tok *SoftHSMToken, keyPath, label, idHex string) error {
	if _, err := s.run(ctx, "--import", keyPath, "--token", tok.Label, "--label", label, "--id", idHex,
		"--pin", tok.PIN); err != nil {
		return fmt.Errorf("importing key %q into SoftHSM token %q: %w", label, tok.Label, err)
	}
	return nil
}

// run runs softhsm2-util under this configuration. Errors carry the tool's
// output with the PINs of the arguments removed.
func (s *SoftHSM) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, s.util, args...)
	cmd.Env = append(os.Environ(), s.Env())
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		for i, a := range args {
			if (a == "--pin" || a == "--so-pin") && i+1 < len(args) && args[i+1] != "" {
				msg = strings.ReplaceAll(msg, args[i+1], "<redacted>")
			}
		}
		return nil, fmt.Errorf("softhsm2-util %s: %w: %s", args[0], err, msg)
	}
	return out.Bytes(), nil
}

// randomPIN returns a random 16-hex-digit PIN.
func randomPIN() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generating a PIN: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// softhsmTokenURI builds pkcs11:token=L?module-path=M&pin-source=file://P with
// RFC 7512 percent-encoding.
func softhsmTokenURI(label, modulePath, pinFile string) string {
	return "pkcs11:token=" + pk11Escape(label, false) +
		"?module-path=" + pk11Escape(modulePath, true) +
		"&pin-source=" + pk11Escape("file://"+pinFile, true)
}

// pk11Escape percent-encodes everything RFC 7512 does not allow unencoded in
// a path (query=false) or query (query=true) attribute value.
func pk11Escape(s string, query bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			strings.IndexByte("-._~:[]@!$'()*+,=", c) >= 0,
			query && (c == '/' || c == '|'):
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}
