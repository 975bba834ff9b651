package hsm

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func uintPtr(v uint) *uint { return &v }

func TestParseURI(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    URI
		pin     string // pin-value
		canon   string
		wantErr string
	}{
		{
			name:  "reference example",
			in:    "pkcs11:token=ca;id=%01;object=ca-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:///run/secrets/pin",
			want:  URI{Token: "ca", ID: []byte{1}, Object: "ca-key", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "file:///run/secrets/pin"},
			canon: "pkcs11:token=ca;id=%01;object=ca-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:///run/secrets/pin",
		},
		{
			name:  "all path attributes",
			in:    "pkcs11:library-description=Soft;library-manufacturer=SoftHSM;library-version=2.6;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;serial=abc123;token=my%20token;slot-description=s;slot-manufacturer=m;slot-id=7;id=%ab%CD;object=k;type=private",
			want:  URI{LibraryDescription: "Soft", LibraryManufacturer: "SoftHSM", LibraryVersion: "2.6", Manufacturer: "SoftHSM project", Model: "SoftHSM v2", Serial: "abc123", Token: "my token", SlotDescription: "s", SlotManufacturer: "m", SlotID: uintPtr(7), ID: []byte{0xab, 0xcd}, Object: "k", Type: "private"},
			canon: "pkcs11:library-description=Soft;library-manufacturer=SoftHSM;library-version=2.6;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;serial=abc123;token=my%20token;slot-description=s;slot-manufacturer=m;slot-id=7;id=%AB%CD;object=k;type=private",
		},
		{
			name:  "query attributes in the path (smallstep, SPIRE style)",
			in:    "pkcs11:token=ca;module-path=/m.so;pin-value=1234;max-sessions=4",
			want:  URI{Token: "ca", ModulePath: "/m.so", MaxSessions: 4},
			pin:   "1234",
			canon: "pkcs11:token=ca?module-path=/m.so&max-sessions=4",
		},
		{
			name:  "path attributes in the query",
			in:    "pkcs11:?token=ca&object=k&module-name=softhsm2",
			want:  URI{Token: "ca", Object: "k", ModuleName: "softhsm2"},
			canon: "pkcs11:token=ca;object=k?module-name=softhsm2",
		},
		{
			name:  "absolute path pin-source and id printable bytes",
			in:    "PKCS11:token=a;id=ab?pin-source=/run/pin",
			want:  URI{Token: "a", ID: []byte("ab"), PINSource: "/run/pin"},
			canon: "pkcs11:token=a;id=%61%62?pin-source=/run/pin",
		},
		{
			name:  "empty values and separators",
			in:    "pkcs11:;token=;object=x;?&",
			want:  URI{Object: "x"},
			canon: "pkcs11:object=x",
		},
		{name: "empty", in: "pkcs11:", want: URI{}, canon: "pkcs11:"},
		{name: "wrong scheme", in: "file:token=a", wantErr: `must start with "pkcs11:"`},
		{name: "no scheme", in: "token=a", wantErr: `must start with "pkcs11:"`},
		{name: "unknown attribute", in: "pkcs11:token=a;colour=blue", wantErr: `unknown attribute "colour"`},
		{name: "unknown query attribute", in: "pkcs11:token=a?x-vendor=1", wantErr: `unknown attribute "x-vendor"`},
		{name: "no value", in: "pkcs11:token", wantErr: `attribute "token" has no value`},
		{name: "duplicate", in: "pkcs11:token=a?token=b", wantErr: `"token" appears twice`},
		{name: "bad percent", in: "pkcs11:id=%zz", wantErr: "bad percent-encoding"},
		{name: "bad percent in pin hides value", in: "pkcs11:token=a?pin-value=s3cr3tpin%", wantErr: "bad percent-encoding in pin-value"},
		{name: "pin-source and pin-value", in: "pkcs11:token=a?pin-source=/p&pin-value=1234", wantErr: "mutually exclusive"},
		{name: "relative module-path", in: "pkcs11:token=a?module-path=libsofthsm2.so", wantErr: "not absolute"},
		{name: "relative pin-source", in: "pkcs11:token=a?pin-source=pin.txt", wantErr: "not a file: URI"},
		{name: "remote pin-source", in: "pkcs11:token=a?pin-source=file://host/pin", wantErr: "remote host"},
		{name: "pin-source command", in: "pkcs11:token=a?pin-source=%7C/bin/pin", wantErr: "not supported"},
		{name: "bad type", in: "pkcs11:type=key", wantErr: `type "key"`},
		{name: "bad slot-id", in: "pkcs11:slot-id=-1", wantErr: "slot-id"},
		{name: "bad max-sessions", in: "pkcs11:max-sessions=0", wantErr: "max-sessions"},
		{name: "bad library-version", in: "pkcs11:library-version=2.x", wantErr: "library-version"},
		{name: "fragment", in: "pkcs11:token=a#frag", wantErr: "fragments"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u, err := ParseURI(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseURI(%q) error = %v, want containing %q", tc.in, err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "s3cr3tpin") {
					t.Errorf("error reveals the pin-value: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseURI(%q): %v", tc.in, err)
			}
			want := tc.want
			want.pinValue = tc.pin
			if !reflect.DeepEqual(*u, want) {
				t.Errorf("ParseURI(%q) =\n%#v\nwant\n%#v (pin %q vs %q)", tc.in, *u, want, u.pinValue, want.pinValue)
			}
			if got := u.String(); got != tc.canon {
				t.Errorf("String() = %q, want %q", got, tc.canon)
			}
			if tc.pin != "" && !u.HasPINValue() {
				t.Error("HasPINValue() = false")
			}
		})
	}
}

// TestURINeverShowsPIN checks every way of printing a URI.
func TestURINeverShowsPIN(t *testing.T) {
	u, err := ParseURI("pkcs11:token=ca?module-path=/m.so&pin-value=s3cr3t-PIN")
	if err != nil {
		t.Fatal(err)
	}
	var logBuf bytes.Buffer
	slog.New(slog.NewTextHandler(&logBuf, nil)).Info("opening", "uri", u, "uri2", *u)
	for name, s := range map[string]string{
		"String": u.String(),
		"%v":     fmt.Sprintf("%v", u),
		"%+v":    fmt.Sprintf("%+v", *u),
		"%#v":    fmt.Sprintf("%#v", *u),
		"%s":     fmt.Sprintf("%s", u),
		"slog":   logBuf.String(),
	} {
		if strings.Contains(s, "s3cr3t") {
			t.Errorf("%s shows the PIN: %s", name, s)
		}
		if !strings.Contains(s, "token=ca") {
			t.Errorf("%s lost the URI: %s", name, s)
		}
	}
	if pin, err := u.PIN(); err != nil || pin != "s3cr3t-PIN" {
		t.Errorf("PIN() = %q, %v", pin, err)
	}
}

func TestURIPIN(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, source, want, wantErr string
	}{
		{name: "file URI, newline", source: "file://" + write("a", "1234\n"), want: "1234"},
		{name: "file URI, CRLF", source: "file://" + write("b", "1234\r\n"), want: "1234"},
		{name: "absolute path", source: write("c", "abcd"), want: "abcd"},
		{name: "localhost", source: "file://localhost" + write("d", "x y"), want: "x y"},
		{name: "missing file", source: "file://" + filepath.Join(dir, "none"), wantErr: "reading PIN file"},
		{name: "empty file", source: write("e", "\n"), wantErr: "empty"},
		{name: "huge file", source: write("f", strings.Repeat("9", maxPINFileLen+1)), wantErr: "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := &URI{PINSource: tc.source}
			got, err := u.PIN()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("PIN() error = %v, want %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "999999") {
					t.Errorf("error shows file contents: %v", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("PIN() = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if pin, err := (&URI{}).PIN(); pin != "" || err != nil {
		t.Errorf("PIN() of a URI without PIN = %q, %v", pin, err)
	}
	u := &URI{PINSource: "/x"}
	u.SetPINValue("1111")
	if u.PINSource != "" || !u.HasPINValue() || strings.Contains(u.String(), "1111") {
		t.Errorf("SetPINValue: %+v / %s", u, u)
	}
}

// FuzzParseURI: the parser never panics, and whatever it accepts prints to a
// canonical form that parses back to the same URI (minus the pin-value,
// which String leaves out) and prints identically.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=ca;id=%01;object=ca-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:///run/secrets/pin",
		"pkcs11:token=a;module-path=/m.so;pin-value=1234;max-sessions=4",
		"pkcs11:?token=ca&object=k&module-name=softhsm2&slot-id=3",
		"pkcs11:library-version=2.6;type=cert;id=ab%00",
		"pkcs11:token=%3B%3F%26%3D%25",
		"pkcs11:",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		canon := u.String()
		u2, err := ParseURI(canon)
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", canon, s, err)
		}
		want := *u
		want.pinValue = ""
		if !reflect.DeepEqual(*u2, want) {
			t.Fatalf("round trip of %q via %q:\n got %#v\nwant %#v", s, canon, *u2, want)
		}
		if again := u2.String(); again != canon {
			t.Fatalf("String not stable: %q then %q", canon, again)
		}
		if u.HasPINValue() && strings.Contains(canon, "pin-value") {
			t.Fatalf("canonical form %q shows pin-value", canon)
		}
	})
}
