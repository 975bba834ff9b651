package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(bundle, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	base := Flags{ServerAddress: "127.0.0.1:8081", TrustBundle: bundle}
	cases := []struct {
		name    string
		doc     string
		flags   Flags
		wantErr string
		check   func(*testing.T, *Config)
	}{
		{
			name:  "flags only",
			flags: Flags{ServerAddress: "srv:8081", TrustBundle: bundle, TPM: "unix:///run/swtpm.sock", SocketPath: "/run/wl.sock"},
			check: func(t *testing.T, c *Config) {
				if c.ServerAddress != "srv:8081" || c.TPM != "unix:///run/swtpm.sock" || c.SocketPath != "/run/wl.sock" || c.TrustDomain.String() != DefaultTrustDomain {
					t.Errorf("%+v", c)
				}
			},
		},
		{
			name: "file with flag override",
			doc: `agent {
  server_address = "10.0.0.1:8081"
  tpm = "tcp://127.0.0.1:2321"
  trust_bundle_path = "` + bundle + `"
  trust_domain = "prod.test"
  log_level = "DEBUG"
}`,
			flags: Flags{LogFormat: "json"},
			check: func(t *testing.T, c *Config) {
				if c.ServerAddress != "10.0.0.1:8081" || c.TPM != "tcp://127.0.0.1:2321" || c.TrustDomain.String() != "prod.test" || c.LogLevel != "debug" || c.LogFormat != "json" {
					t.Errorf("%+v", c)
				}
			},
		},
		{name: "unknown key", doc: `agent { server_adress = "x:1" }`, flags: base, wantErr: "agent.server_adress (line 1)"},
		{name: "unknown block", doc: `plugins { }`, flags: base, wantErr: "unknown configuration key(s): plugins"},
		{name: "no server", flags: Flags{TrustBundle: bundle}, wantErr: "agent.server_address"},
		{name: "server without port", flags: Flags{ServerAddress: "srv", TrustBundle: bundle}, wantErr: "not host:port"},
		{name: "no bundle", flags: Flags{ServerAddress: "srv:1"}, wantErr: "agent.trust_bundle_path"},
		{name: "missing bundle file", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle + ".nope"}, wantErr: "agent.trust_bundle_path"},
		{name: "relative unix tpm", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, TPM: "unix://swtpm.sock"}, wantErr: "agent.tpm"},
		{name: "bad tpm scheme", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, TPM: "http://x"}, wantErr: "unknown scheme"},
		{name: "relative device", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, TPM: "tpmrm0"}, wantErr: "absolute"},
		{name: "bad trust domain", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, TrustDomain: "A B"}, wantErr: "agent.trust_domain"},
		{name: "bad log level", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, LogLevel: "chatty"}, wantErr: "agent.log_level"},
		{name: "bad log format", flags: Flags{ServerAddress: "srv:1", TrustBundle: bundle, LogFormat: "xml"}, wantErr: "agent.log_format"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.doc), tc.flags)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}
