package simulator_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var suite *simtest.Suite

// childEnv makes the test binary act as a process that starts swtpm and
// dies without stopping it (TestNoOrphanWhenParentDies).
const childEnv = "IRONROOT_SIMULATOR_TEST_CHILD_STATE"

func TestMain(m *testing.M) {
	if dir := os.Getenv(childEnv); dir != "" {
		os.Exit(orphanChild(dir))
	}
	suite = simtest.MustSuite()
	code := m.Run()
	suite.Close()
	os.Exit(code)
}

// conn is a minimal go-tpm transport over a swtpm data channel; the tpm
// package has the real one, but the harness is tested on its own.
type conn struct{ c net.Conn }

func dialTPM(t *testing.T, s *simulator.SWTPM) *conn {
	t.Helper()
	network, addr, _ := strings.Cut(s.Address(), "://")
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatalf("dialing %s: %v", s.Address(), err)
	}
	t.Cleanup(func() { c.Close() })
	return &conn{c}
}

func (c *conn) Send(cmd []byte) ([]byte, error) {
	if _, err := c.c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c.c, hdr); err != nil {
		return nil, err
	}
	rest := make([]byte, binary.BigEndian.Uint32(hdr[2:6])-10)
	if _, err := io.ReadFull(c.c, rest); err != nil {
		return nil, err
	}
	return append(hdr, rest...), nil
}

func readNV(t *testing.T, c *conn, index uint32) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(c)
	if err != nil {
		t.Fatalf("NV_ReadPublic 0x%x: %v", index, err)
	}
	nvPub, err := pub.NVPublic.Contents()
	if err != nil {
		t.Fatalf("NV public 0x%x: %v", index, err)
	}
	var out []byte
	for off := uint16(0); off < nvPub.DataSize; {
		n := min(nvPub.DataSize-off, 1024)
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(c)
		if err != nil {
			t.Fatalf("NV_Read 0x%x: %v", index, err)
		}
		out = append(out, rsp.Data.Buffer...)
		off += n
	}
	return out
}

func parseEKCert(t *testing.T, b []byte) *x509.Certificate {
	t.Helper()
	// The TCG NV header 10 01 <len16>, if present, precedes the DER.
	if len(b) > 4 && b[0] == 0x10 && b[1] == 0x01 {
		b = b[4:]
	}
	var raw asn1.RawValue
	rest, err := asn1.Unmarshal(b, &raw)
	if err != nil {
		t.Fatalf("EK certificate DER: %v", err)
	}
	cert, err := x509.ParseCertificate(b[:len(b)-len(rest)])
	if err != nil {
		t.Fatalf("parsing EK certificate: %v", err)
	}
	return cert
}

func verifyEK(cert *x509.Certificate, ca *simulator.CA) error {
	// EK certificates carry a critical SAN Go does not parse and the EK
	// EKU: the TCG quirks a verifier tolerates.
	var unhandled []asn1.ObjectIdentifier
	for _, oid := range cert.UnhandledCriticalExtensions {
		if !oid.Equal(asn1.ObjectIdentifier{2, 5, 29, 17}) {
			unhandled = append(unhandled, oid)
		}
	}
	cert.UnhandledCriticalExtensions = unhandled
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.Root())
	inter.AddCert(ca.Intermediate())
	_, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func TestCA(t *testing.T) {
	ca := suite.CA
	if ca.Root().Subject.CommonName != "swtpm-localca-rootca" {
		t.Errorf("root CN = %q", ca.Root().Subject.CommonName)
	}
	if ca.Intermediate().Subject.CommonName != "swtpm-localca" {
		t.Errorf("intermediate CN = %q", ca.Intermediate().Subject.CommonName)
	}
	if err := ca.Intermediate().CheckSignatureFrom(ca.Root()); err != nil {
		t.Errorf("intermediate not signed by root: %v", err)
	}
	for _, p := range []string{ca.RootPath(), ca.IntermediatePath()} {
		if !strings.HasPrefix(p, ca.Dir()) {
			t.Errorf("anchor %s outside the CA directory %s", p, ca.Dir())
		}
	}
	again, err := simulator.NewCA(context.Background(), ca.Dir())
	if err != nil {
		t.Fatalf("reopening CA: %v", err)
	}
	if !again.Root().Equal(ca.Root()) {
		t.Error("reopening the CA directory made a new root")
	}
}

func TestManufacturedEKs(t *testing.T) {
	other := simtest.NewCA(t)
	s := suite.Start(t)
	c := dialTPM(t, s)
	tests := []struct {
		name   string
		nv     uint32
		handle uint32
	}{
		{"rsa2048", 0x01c00002, 0x81010001},
		{"p384", 0x01c00016, 0x81010016},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cert := parseEKCert(t, readNV(t, c, tc.nv))
			if err := verifyEK(cert, suite.CA); err != nil {
				t.Errorf("EK certificate does not chain to the CA: %v", err)
			}
			if err := verifyEK(cert, other); err == nil {
				t.Error("EK certificate chains to an unrelated CA")
			}
			rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(tc.handle)}.Execute(c)
			if err != nil {
				t.Fatalf("ReadPublic: %v", err)
			}
			pub, err := rp.OutPublic.Contents()
			if err != nil {
				t.Fatal(err)
			}
			var key any
			if pub.Type == tpm2.TPMAlgRSA {
				key, err = tpm2.RSAPub(mustRSAParms(t, pub), mustRSA(t, pub))
			} else {
				key, err = tpm2.ECDSAPub(mustECCParms(t, pub), mustECC(t, pub))
			}
			if err != nil {
				t.Fatal(err)
			}
			if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(key) {
				t.Error("EK certificate key differs from the persistent EK")
			}
		})
	}
}

func mustRSA(t *testing.T, p *tpm2.TPMTPublic) *tpm2.TPM2BPublicKeyRSA {
	u, err := p.Unique.RSA()
	if err != nil {
		t.Fatal(err)
	}
	return u
}
func mustRSAParms(t *testing.T, p *tpm2.TPMTPublic) *tpm2.TPMSRSAParms {
	u, err := p.Parameters.RSADetail()
	if err != nil {
		t.Fatal(err)
	}
	return u
}
func mustECC(t *testing.T, p *tpm2.TPMTPublic) *tpm2.TPMSECCPoint {
	u, err := p.Unique.ECC()
	if err != nil {
		t.Fatal(err)
	}
	return u
}
func mustECCParms(t *testing.T, p *tpm2.TPMTPublic) *tpm2.TPMSECCParms {
	u, err := p.Parameters.ECCDetail()
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func clock(t *testing.T, s *simulator.SWTPM) tpm2.TPMSClockInfo {
	t.Helper()
	c := dialTPM(t, s)
	defer c.c.Close()
	rsp, err := tpm2.ReadClock{}.Execute(c)
	if err != nil {
		t.Fatalf("ReadClock: %v", err)
	}
	return rsp.CurrentTime.ClockInfo
}

func TestStartRebootStop(t *testing.T) {
	tests := []struct {
		name   string
		opts   []simulator.StartOption
		scheme string
	}{
		{"unix", nil, "unix:///"},
		{"tcp", []simulator.StartOption{simulator.WithTCP()}, "tcp://127.0.0.1:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s := suite.Start(t, tc.opts...)
			if !strings.HasPrefix(s.Address(), tc.scheme) {
				t.Errorf("Address() = %q, want prefix %q", s.Address(), tc.scheme)
			}
			before := clock(t, s)
			if before.Safe != tpm2.TPMIYesNo(true) {
				t.Error("fresh TPM clock not safe")
			}
			if err := s.Reboot(ctx); err != nil {
				t.Fatalf("Reboot: %v", err)
			}
			after := clock(t, s)
			if after.ResetCount != before.ResetCount+1 {
				t.Errorf("clean reboot: resetCount %d -> %d, want +1", before.ResetCount, after.ResetCount)
			}
			if after.Safe != tpm2.TPMIYesNo(true) {
				t.Error("clean reboot: clock not safe")
			}
			if err := s.PowerLoss(ctx); err != nil {
				t.Fatalf("PowerLoss: %v", err)
			}
			lost := clock(t, s)
			if lost.ResetCount != after.ResetCount+1 {
				t.Errorf("power loss: resetCount %d -> %d, want +1", after.ResetCount, lost.ResetCount)
			}
			if lost.Safe != tpm2.TPMIYesNo(false) {
				t.Error("power loss: clock still safe")
			}
			pid := s.PID()
			if err := s.Stop(); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			if err := s.Stop(); err != nil {
				t.Fatalf("second Stop: %v", err)
			}
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("swtpm pid %d still exists after Stop (kill 0: %v)", pid, err)
			}
			network, addr, _ := strings.Cut(s.Address(), "://")
			if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
				c.Close()
				t.Error("data channel still accepts connections after Stop")
			}
		})
	}
}

func TestCloneKeepsEKs(t *testing.T) {
	a := suite.Start(t)
	b := suite.Start(t)
	read := func(s *simulator.SWTPM) []byte {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(0x81010001)}.Execute(dialTPM(t, s))
		if err != nil {
			t.Fatalf("ReadPublic: %v", err)
		}
		return rp.OutPublic.Bytes()
	}
	if !bytes.Equal(read(a), read(b)) {
		t.Error("two clones of one state have different EKs")
	}
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		run  func() error
		want string
	}{
		{"start without state", func() error { _, err := simulator.Start(ctx, nil); return err }, "no TPM state"},
		{"open empty dir", func() error { _, err := simulator.OpenState(t.TempDir()); return err }, "no manufactured TPM"},
		{"manufacture twice", func() error { _, err := suite.CA.Manufacture(ctx, suite.State.Dir); return err }, "already holds"},
		{"bad tcp address", func() error {
			_, err := simulator.Start(ctx, suite.State, simulator.WithTCPAddr("nonsense"))
			return err
		}, "parsing TCP address"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestTwoInstancesOnOneStateRefused(t *testing.T) {
	st := simtest.Clone(t, suite.State)
	simtest.StartTPM(t, st)
	s, err := simulator.Start(context.Background(), st)
	if err == nil {
		s.Stop()
		t.Fatal("second swtpm on a locked state started")
	}
	t.Logf("refused as expected: %v", err)
}

func orphanChild(dir string) int {
	st, err := simulator.OpenState(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Sockets inside the test's directory: nothing calls Stop to remove a
	// temporary socket directory.
	s, err := simulator.Start(context.Background(), st, simulator.WithSocketPath(filepath.Join(dir, "s.sock")))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(s.PID())
	return 0 // exit without Stop, as a crashing test would
}

// TestNoOrphanWhenParentDies starts swtpm from a child process that exits
// without stopping it: the kernel must kill swtpm (Pdeathsig).
func TestNoOrphanWhenParentDies(t *testing.T) {
	st := simtest.Clone(t, suite.State)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+st.Dir)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v (%s)", err, out)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("child printed %q, want a pid", out)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) }) // only if the check failed
	// A hang guard, not a speed check: the kernel signals at once.
	deadline := time.Now().Add(20 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("swtpm pid %d outlived the process that started it", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// alive reports whether pid runs (a zombie awaiting its reaper is dead).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}
