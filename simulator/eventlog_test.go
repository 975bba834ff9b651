package simulator

import (
	"crypto"
	"testing"

	"github.com/google/go-attestation/attest"
)

func TestUEFIBootLogReplays(t *testing.T) {
	for _, sb := range []bool{true, false} {
		l, err := UEFIBootLog(BootOptions{SecureBoot: sb, Kernel: "vmlinuz-test"})
		if err != nil {
			t.Fatal(err)
		}
		el, err := attest.ParseEventLog(l.Bytes())
		if err != nil {
			t.Fatalf("go-attestation cannot parse the log: %v", err)
		}
		var pcrs []attest.PCR
		for i, d := range l.PCRs() {
			pcrs = append(pcrs, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
		}
		events, err := el.Verify(pcrs)
		if err != nil {
			t.Fatalf("log does not replay to its own PCRs: %v", err)
		}
		if len(events) != len(l.Extends()) {
			t.Fatalf("%d events replayed, %d extended", len(events), len(l.Extends()))
		}
		state, err := attest.ParseSecurebootState(events)
		if err != nil {
			t.Fatalf("ParseSecurebootState: %v", err)
		}
		if state.Enabled != sb {
			t.Fatalf("Secure Boot %v, want %v", state.Enabled, sb)
		}
	}
}

func TestEventLogCloneIsDeep(t *testing.T) {
	l := &EventLog{}
	l.Measure(4, EvIPL, []byte("x"))
	c := l.Clone()
	c.Events[0].Data[0] = 'y'
	c.Events[0].Digest[0] ^= 1
	if l.Events[0].Data[0] != 'x' || l.Events[0].Digest[0] == c.Events[0].Digest[0] {
		t.Fatal("Clone shares memory with the original")
	}
}
