package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots")
	if err := os.Mkdir(roots, 0o755); err != nil {
		t.Fatal(err)
	}
	allow := filepath.Join(dir, "allow")
	if err := os.WriteFile(allow, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	const hsm = `hsm = "pkcs11:token=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234"`
	tpm := `node_attestation { tpm { ek_root_dir = "` + roots + `" } }`
	full := `
server {
  trust_domain = "prod.example"
  bind_address = "127.0.0.1"
  bind_port = 9000
  socket_path = "/run/ironroot/api.sock"
  data_dir = "/var/lib/ironroot"
  log_level = "DEBUG"
  log_format = "json"
  ca_ttl = "48h"
  default_x509_svid_ttl = "30m"
  ca_key_type = "ec-p384"
  attest_step_timeout = "10s"
  ` + hsm + `
}
node_attestation {
  tpm {
    ek_root_dir = "` + roots + `"
    ek_hash_allow_list = "` + allow + `"
    require_ek_certificate = false
    pcrs = [7, 0, 4]
    required_pcrs = { "7" = "` + strings.Repeat("ab", 32) + `" }
  }
}
health_checks {
  listener_enabled = true
  bind_port = 8089
}
`
	cases := []struct {
		name    string
		doc     string
		flags   Flags
		wantErr string
		check   func(*testing.T, *Config)
	}{
		{
			name: "full file",
			doc:  full,
			check: func(t *testing.T, c *Config) {
				if c.TrustDomain.String() != "prod.example" || c.ServerPort != 9000 || c.BindAddress != "127.0.0.1" {
					t.Errorf("server keys: %+v", c)
				}
				if c.LogLevel != "debug" || c.LogFormat != "json" || c.CATTL != 48*time.Hour || c.CAKeyType != "ec-p384" {
					t.Errorf("server keys: %+v", c)
				}
				if c.AttestStepTimeout != 10*time.Second {
					t.Errorf("attest_step_timeout: %v", c.AttestStepTimeout)
				}
				if c.DefaultX509SVIDTTL != 30*time.Minute || c.AgentTTL != 30*time.Minute || c.DefaultJWTSVIDTTL != DefaultJWTSVIDTTL {
					t.Errorf("ttls: %+v", c)
				}
				p := c.NodeAttestation
				if p.RequireEKCertificate || len(p.PCRs) != 3 || p.PCRs[0] != 0 || p.PCRs[2] != 7 || len(p.RequiredPCRs[7]) != 32 {
					t.Errorf("tpm policy: %+v", p)
				}
				if !c.Health.Enabled || c.Health.BindPort != 8089 || c.Health.LivePath != "/live" {
					t.Errorf("health: %+v", c.Health)
				}
			},
		},
		{
			name:  "flags only",
			flags: Flags{HSM: "pkcs11:token=x", TrustDomain: "td.test", ServerPort: "7000", DataDir: "/d"},
			doc:   tpm,
			check: func(t *testing.T, c *Config) {
				if c.TrustDomain.String() != "td.test" || c.ServerPort != 7000 || c.DataDir != "/d" {
					t.Errorf("flags not applied: %+v", c)
				}
				if c.BindAddress != DefaultBindAddress || c.SocketPath != DefaultSocketPath || c.CATTL != DefaultCATTL || c.AttestStepTimeout != DefaultAttestStep {
					t.Errorf("defaults not applied: %+v", c)
				}
				if !c.NodeAttestation.RequireEKCertificate || len(c.NodeAttestation.PCRs) != 8 {
					t.Errorf("default policy: %+v", c.NodeAttestation)
				}
			},
		},
		{
			name:  "flag overrides file",
			doc:   full,
			flags: Flags{LogLevel: "warn", ServerPort: "1234"},
			check: func(t *testing.T, c *Config) {
				if c.LogLevel != "warn" || c.ServerPort != 1234 {
					t.Errorf("override: %+v", c)
				}
			},
		},
		{name: "unknown top key", doc: tpm + "\nfoo = 1\nserver {" + hsm + "}", wantErr: "unknown configuration key(s): foo"},
		{name: "unknown server key", doc: tpm + "\nserver {\n" + hsm + "\n bind_prot = 1 }", wantErr: "server.bind_prot"},
		{name: "unknown tpm key", doc: `node_attestation { tpm { ek_root_dir = "` + roots + `"
 pcr = [1] } }
server {` + hsm + `}`, wantErr: "node_attestation.tpm.pcr"},
		{name: "bad trust domain", doc: tpm, flags: Flags{HSM: "pkcs11:token=x", TrustDomain: "Bad Domain"}, wantErr: "server.trust_domain"},
		{name: "bad port flag", doc: tpm, flags: Flags{HSM: "pkcs11:token=x", ServerPort: "http"}, wantErr: "-serverPort"},
		{name: "bad bind address", doc: tpm, flags: Flags{HSM: "pkcs11:token=x", BindAddress: "localhost"}, wantErr: "server.bind_address"},
		{name: "bad log level", doc: tpm, flags: Flags{HSM: "pkcs11:token=x", LogLevel: "loud"}, wantErr: "server.log_level"},
		{name: "bad duration", doc: tpm + "\nserver {" + hsm + "\n ca_ttl = \"soon\" }", wantErr: "server.ca_ttl"},
		{name: "bad key type", doc: tpm + "\nserver {" + hsm + "\n ca_key_type = \"dsa\" }", wantErr: "server.ca_key_type"},
		{name: "missing hsm", doc: tpm, wantErr: "server.hsm"},
		{name: "hsm not a uri", doc: tpm, flags: Flags{HSM: "/usr/lib/softhsm.so"}, wantErr: "server.hsm"},
		{name: "missing tpm block", flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "node_attestation.tpm"},
		{name: "missing root dir", doc: `node_attestation { tpm { ek_root_dir = "` + filepath.Join(dir, "nope") + `" } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "node_attestation.tpm.ek_root_dir"},
		{name: "root dir is a file", doc: `node_attestation { tpm { ek_root_dir = "` + notDir + `" } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "not a directory"},
		{name: "cert required without roots", doc: `node_attestation { tpm { ek_hash_allow_list = "` + allow + `" } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "require_ek_certificate"},
		{name: "pcr out of range", doc: `node_attestation { tpm { ek_root_dir = "` + roots + `"
 pcrs = [24] } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "node_attestation.tpm.pcrs"},
		{name: "required pcr not quoted", doc: `node_attestation { tpm { ek_root_dir = "` + roots + `"
 pcrs = [0]
 required_pcrs = { "7" = "` + strings.Repeat("00", 32) + `" } } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "never quoted"},
		{name: "required pcr bad hex", doc: `node_attestation { tpm { ek_root_dir = "` + roots + `"
 required_pcrs = { "7" = "xyz" } } }`, flags: Flags{HSM: "pkcs11:token=x"}, wantErr: "required_pcrs"},
		{name: "upstream half set", doc: tpm + "\nserver {" + hsm + "\n upstream_ca_key = \"pkcs11:token=up\" }", wantErr: "server.upstream_ca_key"},
		{name: "hcl syntax", doc: "server { ", wantErr: "parsing configuration"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.doc), tc.flags)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got error %v, want one containing %q", err, tc.wantErr)
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

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(Flags{ConfigPath: filepath.Join(t.TempDir(), "server.hcl")})
	if err == nil || !strings.Contains(err.Error(), "reading configuration") {
		t.Fatalf("got %v", err)
	}
}
