package hsm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// URI is a parsed RFC 7512 pkcs11: URI. Attributes are accepted in either the
// path or the query part; String writes the canonical form.
//
// A pin-value is kept unexported and never printed: String, GoString and
// LogValue leave it out, so a URI can be logged as is.
type URI struct {
	// Token attributes (path). Token is the token label.
	Token, Manufacturer, Serial, Model string
	// Library attributes (path).
	LibraryManufacturer, LibraryDescription, LibraryVersion string
	// Slot attributes (path). SlotID is nil when absent.
	SlotManufacturer, SlotDescription string
	SlotID                            *uint
	// Object attributes (path). ID is the raw CKA_ID, Object the CKA_LABEL,
	// Type one of public, private, cert, secret-key, data.
	Object, Type string
	ID           []byte

	// ModulePath is the absolute path of the PKCS#11 module (query).
	ModulePath string
	// ModuleName is the module's name, for systems with a module registry
	// (query). Ironroot needs ModulePath to load a module.
	ModuleName string
	// PINSource is where the PIN is read from: a file: URI or an absolute
	// path (query).
	PINSource string
	// MaxSessions caps the session pool; 0 means unset (query; an extension
	// also used by smallstep).
	MaxSessions int

	pinValue string
}

// Maximum lengths that keep a hostile URI or PIN file from costing much.
const (
	maxURILen     = 64 << 10
	maxPINFileLen = 4 << 10
)

// objectTypes are the RFC 7512 values of the type attribute.
func validObjectType(t string) bool {
	switch t {
	case "public", "private", "cert", "secret-key", "data":
		return true
	}
	return false
}

// ParseURI parses an RFC 7512 pkcs11: URI. Unknown attributes, duplicate
// attributes, malformed percent-encoding, a relative module-path, both
// pin-source and pin-value, and an unusable pin-source are errors. Empty
// attribute values count as absent. Error messages never contain a PIN.
func ParseURI(s string) (*URI, error) {
	if len(s) > maxURILen {
		return nil, fmt.Errorf("parsing pkcs11 URI: longer than %d bytes", maxURILen)
	}
	const scheme = "pkcs11:"
	if len(s) < len(scheme) || !strings.EqualFold(s[:len(scheme)], scheme) {
		return nil, errors.New(`parsing pkcs11 URI: must start with "pkcs11:"`)
	}
	rest := s[len(scheme):]
	if i := strings.IndexByte(rest, '#'); i >= 0 {
		return nil, errors.New("parsing pkcs11 URI: fragments (#) are not allowed")
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}
	parts := [2]struct {
		text, sep string
	}{{path, ";"}, {query, "&"}}
	for _, p := range parts {
		if p.text == "" {
			continue
		}
		for _, attr := range strings.Split(p.text, p.sep) {
			if attr == "" {
				continue
			}
			name, raw, ok := strings.Cut(attr, "=")
			if !ok {
				return nil, fmt.Errorf("parsing pkcs11 URI: attribute %q has no value", trimForError(name))
			}
			if seen[name] {
				return nil, fmt.Errorf("parsing pkcs11 URI: attribute %q appears twice", trimForError(name))
			}
			seen[name] = true
			val, err := url.PathUnescape(raw)
			if err != nil {
				if name == "pin-value" {
					return nil, errors.New("parsing pkcs11 URI: bad percent-encoding in pin-value")
				}
				return nil, fmt.Errorf("parsing pkcs11 URI: bad percent-encoding in %q", trimForError(name))
			}
			if err := u.set(name, val); err != nil {
				return nil, fmt.Errorf("parsing pkcs11 URI: %w", err)
			}
		}
	}
	if u.PINSource != "" && u.pinValue != "" {
		return nil, errors.New("parsing pkcs11 URI: pin-source and pin-value are mutually exclusive")
	}
	return u, nil
}

// trimForError bounds attacker-chosen text quoted in an error.
func trimForError(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

func (u *URI) set(name, val string) error {
	if val == "" {
		return nil
	}
	switch name {
	case "token":
		u.Token = val
	case "manufacturer":
		u.Manufacturer = val
	case "serial":
		u.Serial = val
	case "model":
		u.Model = val
	case "library-manufacturer":
		u.LibraryManufacturer = val
	case "library-description":
		u.LibraryDescription = val
	case "library-version":
		if !validLibraryVersion(val) {
			return fmt.Errorf("library-version %q is not N or N.M", trimForError(val))
		}
		u.LibraryVersion = val
	case "slot-manufacturer":
		u.SlotManufacturer = val
	case "slot-description":
		u.SlotDescription = val
	case "slot-id":
		n, err := strconv.ParseUint(val, 10, 64)
		if err != nil || uint64(uint(n)) != n {
			return fmt.Errorf("slot-id %q is not a decimal number", trimForError(val))
		}
		id := uint(n)
		u.SlotID = &id
	case "object":
		u.Object = val
	case "type":
		if !validObjectType(val) {
			return fmt.Errorf("type %q is not one of public, private, cert, secret-key, data", trimForError(val))
		}
		u.Type = val
	case "id":
		u.ID = []byte(val)
	case "module-path":
		if !filepath.IsAbs(val) {
			return fmt.Errorf("module-path %q is not absolute", trimForError(val))
		}
		u.ModulePath = val
	case "module-name":
		u.ModuleName = val
	case "pin-source":
		if _, err := pinSourcePath(val); err != nil {
			return err
		}
		u.PINSource = val
	case "pin-value":
		u.pinValue = val
	case "max-sessions":
		n, err := strconv.Atoi(val)
		if err != nil || n < 1 || n > 1<<16 {
			return fmt.Errorf("max-sessions %q is not a number from 1 to 65536", trimForError(val))
		}
		u.MaxSessions = n
	default:
		return fmt.Errorf("unknown attribute %q", trimForError(name))
	}
	return nil
}

func validLibraryVersion(v string) bool {
	major, minor, hasMinor := strings.Cut(v, ".")
	digits := func(s string) bool {
		if s == "" || len(s) > 3 {
			return false
		}
		for _, c := range s {
			if c < '0' || c > '9' {
				return false
			}
		}
		return true
	}
	return digits(major) && (!hasMinor || digits(minor))
}

// pinSourcePath returns the file a pin-source names: a file: URI with an
// absolute path (file:///p or file:/p) or an absolute path. Commands
// ("|/bin/cmd") are refused: running programs named in a URI is not worth
// the risk.
func pinSourcePath(src string) (string, error) {
	p := src
	if strings.HasPrefix(src, "|") {
		return "", errors.New("pin-source commands (|...) are not supported; use a file")
	}
	if rest, ok := strings.CutPrefix(src, "file:"); ok {
		switch {
		case strings.HasPrefix(rest, "///"):
			p = rest[2:]
		case strings.HasPrefix(rest, "//localhost/"):
			p = rest[len("//localhost"):]
		case strings.HasPrefix(rest, "//"):
			return "", fmt.Errorf("pin-source %q names a remote host", trimForError(src))
		default:
			p = rest
		}
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("pin-source %q is not a file: URI or an absolute path", trimForError(src))
	}
	return p, nil
}

// HasPINValue reports whether the URI carries a pin-value.
func (u *URI) HasPINValue() bool { return u.pinValue != "" }

// SetPINValue sets the pin-value (and clears PINSource). String never shows it.
func (u *URI) SetPINValue(pin string) {
	u.pinValue = pin
	if pin != "" {
		u.PINSource = ""
	}
}

// PIN returns the PIN: the pin-value, or the contents of the pin-source file
// with one trailing newline removed. It returns "" and no error when the URI
// names no PIN. Errors name the file, never its contents.
func (u *URI) PIN() (string, error) {
	if u.pinValue != "" {
		return u.pinValue, nil
	}
	if u.PINSource == "" {
		return "", nil
	}
	p, err := pinSourcePath(u.PINSource)
	if err != nil {
		return "", fmt.Errorf("reading PIN: %w", err)
	}
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("reading PIN file: %w", err)
	}
	defer f.Close()
	buf, err := io.ReadAll(io.LimitReader(f, maxPINFileLen+1))
	if err != nil {
		return "", fmt.Errorf("reading PIN file %s: %w", p, err)
	}
	n := len(buf)
	if n > maxPINFileLen {
		return "", fmt.Errorf("reading PIN file %s: longer than %d bytes", p, maxPINFileLen)
	}
	pin := strings.TrimSuffix(strings.TrimSuffix(string(buf[:n]), "\n"), "\r")
	if pin == "" {
		return "", fmt.Errorf("reading PIN file %s: file is empty", p)
	}
	return pin, nil
}

// String returns the canonical URI: path attributes in the order of RFC 7512
// §2.3, then module-name, module-path, pin-source and max-sessions. The
// pin-value is left out, so the result is safe to log or print.
func (u URI) String() string {
	var b strings.Builder
	b.WriteString("pkcs11:")
	sep := ""
	path := func(name, val string) {
		if val == "" {
			return
		}
		b.WriteString(sep + name + "=" + escape(val, false))
		sep = ";"
	}
	path("library-description", u.LibraryDescription)
	path("library-manufacturer", u.LibraryManufacturer)
	path("library-version", u.LibraryVersion)
	path("manufacturer", u.Manufacturer)
	path("model", u.Model)
	path("serial", u.Serial)
	path("token", u.Token)
	path("slot-description", u.SlotDescription)
	path("slot-manufacturer", u.SlotManufacturer)
	if u.SlotID != nil {
		path("slot-id", strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	if len(u.ID) > 0 {
		b.WriteString(sep + "id=" + escapeAll(u.ID))
		sep = ";"
	}
	path("object", u.Object)
	path("type", u.Type)
	sep = "?"
	query := func(name, val string) {
		if val == "" {
			return
		}
		b.WriteString(sep + name + "=" + escape(val, true))
		sep = "&"
	}
	query("module-name", u.ModuleName)
	query("module-path", u.ModulePath)
	query("pin-source", u.PINSource)
	if u.MaxSessions > 0 {
		query("max-sessions", strconv.Itoa(u.MaxSessions))
	}
	return b.String()
}

// GoString is String, so %#v never shows the pin-value either.
func (u URI) GoString() string { return u.String() }

// LogValue makes slog print the URI without its pin-value.
func (u URI) LogValue() slog.Value { return slog.StringValue(u.String()) }

// escape percent-encodes what RFC 7512 does not allow unencoded in a path
// (query=false) or query (query=true) attribute value.
func escape(s string, query bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			strings.IndexByte("-._~:[]@!$'()*+,", c) >= 0,
			query && (c == '/' || c == '|'):
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// escapeAll percent-encodes every byte, as RFC 7512 asks for id.
func escapeAll(id []byte) string {
	var b strings.Builder
	for _, c := range id {
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}
