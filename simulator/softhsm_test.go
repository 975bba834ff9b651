package simulator

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestSoftHSMInitToken(t *testing.T) {
	ctx := context.Background()
	s, err := NewSoftHSM(filepath.Join(t.TempDir(), "hsm"))
	if err != nil {
		t.Fatalf("NewSoftHSM: %v", err)
	}
	conf, err := os.ReadFile(s.ConfPath())
	if err != nil {
		t.Fatalf("reading conf: %v", err)
	}
	for _, want := range []string{
		"directories.tokendir = " + s.TokenDir() + "\n",
		"objectstore.backend = file\n",
		"log.level = ERROR\n",
		"slots.removable = false\n",
	} {
		if !strings.Contains(string(conf), want) {
			t.Errorf("softhsm2.conf lacks %q:\n%s", want, conf)
		}
	}
	if got, want := s.Env(), "SOFTHSM2_CONF="+s.ConfPath(); got != want {
		t.Errorf("Env() = %q, want %q", got, want)
	}

	tests := []struct {
		name, label, pin string
		wantErr          string
	}{
		{name: "random PIN", label: "ca-a"},
		{name: "given PIN", label: "ca b/2", pin: "1234"},
		{name: "duplicate label", label: "ca-a", wantErr: "already exists"},
		{name: "empty label", label: "", wantErr: "label must be"},
		{name: "long label", label: strings.Repeat("x", 33), wantErr: "label must be"},
		{name: "short PIN", label: "ca-c", pin: "12", wantErr: "PIN must be"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := s.InitToken(ctx, tc.label, tc.pin)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("InitToken error = %v, want containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("InitToken: %v", err)
			}
			if tc.pin != "" && tok.PIN != tc.pin {
				t.Errorf("PIN = %q, want %q", tok.PIN, tc.pin)
			}
			if len(tok.PIN) < 4 {
				t.Errorf("PIN %q too short", tok.PIN)
			}
			st, err := os.Stat(tok.PINFile)
			if err != nil {
				t.Fatalf("PIN file: %v", err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Errorf("PIN file mode = %v, want 0600", st.Mode().Perm())
			}
			if b, _ := os.ReadFile(tok.PINFile); string(b) != tok.PIN {
				t.Errorf("PIN file holds %q, want the PIN", b)
			}
			wantURI := "pkcs11:token=" + pk11Escape(tc.label, false) + "?module-path=" + s.ModulePath() +
				"&pin-source=file://" + tok.PINFile
			if tok.URI != wantURI {
				t.Errorf("URI = %q, want %q", tok.URI, wantURI)
			}
			if strings.Contains(tok.URI, tok.PIN) {
				t.Errorf("URI %q contains the PIN", tok.URI)
			}
			if tok.EnvVar() != "SOFTHSM2_CONF" || tok.ConfPath != s.ConfPath() {
				t.Errorf("EnvVar/ConfPath = %q/%q", tok.EnvVar(), tok.ConfPath)
			}
			if !strings.Contains(showSlots(t, s), "Label:            "+tc.label) {
				t.Errorf("--show-slots does not list token %q", tc.label)
			}
		})
	}

	if err := s.DeleteToken(ctx, "ca-a"); err != nil {
		t.Fatalf("DeleteToken: %v", err)
	}
	if strings.Contains(showSlots(t, s), "Label:            ca-a\n") {
		t.Error("token ca-a still listed after DeleteToken")
	}
	if err := s.DeleteToken(ctx, "no-such-token"); err == nil {
		t.Error("DeleteToken of a missing token succeeded")
	}
	// The label is free again once deleted.
	if _, err := s.InitToken(ctx, "ca-a", ""); err != nil {
		t.Errorf("InitToken after delete: %v", err)
	}
}

func TestSoftHSMErrorsRedactPIN(t *testing.T) {
	s, err := NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatalf("NewSoftHSM: %v", err)
	}
	tok := &SoftHSMToken{Label: "missing", PIN: "secret-pin-9876"}
	err = s.ImportKey(context.Background(), tok, filepath.Join(t.TempDir(), "missing.pem"), "k", "01")
	if err == nil {
		t.Fatal("ImportKey into a missing token succeeded")
	}
	if strings.Contains(err.Error(), tok.PIN) {
		t.Errorf("error contains the PIN: %v", err)
	}
}

func TestSoftHSMModulePath(t *testing.T) {
	p, err := SoftHSMModulePath()
	if err != nil {
		t.Fatalf("SoftHSMModulePath: %v", err)
	}
	if !filepath.IsAbs(p) {
		t.Errorf("module path %q is not absolute", p)
	}
}

func showSlots(t *testing.T, s *SoftHSM) string {
	t.Helper()
	cmd := exec.Command(s.util, "--show-slots")
	cmd.Env = append(os.Environ(), s.Env())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --show-slots: %v: %s", err, out)
	}
	return string(out)
}

func TestSoftHSMPreparedTokens(t *testing.T) {
	s, err := NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatalf("NewSoftHSM: %v", err)
	}
	if _, err := s.TakeToken(); err == nil {
		t.Fatal("TakeToken with nothing prepared succeeded")
	}
	if err := s.PrepareTokens(context.Background(), 3); err != nil {
		t.Fatalf("PrepareTokens: %v", err)
	}
	if err := s.PrepareTokens(context.Background(), 1); err != nil {
		t.Fatalf("PrepareTokens again: %v", err)
	}
	seen := map[string]bool{}
	for i := range 4 {
		tok, err := s.TakeToken()
		if err != nil {
			t.Fatalf("TakeToken %d: %v", i, err)
		}
		if seen[tok.Label] {
			t.Errorf("token %q handed out twice", tok.Label)
		}
		seen[tok.Label] = true
		if !strings.Contains(showSlots(t, s), "Label:            "+tok.Label) {
			t.Errorf("prepared token %q not initialised", tok.Label)
		}
	}
	if _, err := s.TakeToken(); err == nil || !strings.Contains(err.Error(), "4 were prepared") {
		t.Errorf("TakeToken after all were taken: %v", err)
	}
}
