package verifier

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
)

// TestSWTPMClock checks the clock rules on real swtpm evidence. The agent's
// AK lives under an endorsement-hierarchy parent, so its quotes carry the
// TPM's real resetCount and restartCount and the verifier compares them.
func TestSWTPMClock(t *testing.T) {
	ctx := context.Background()
	state := simtest.Clone(t, suite.State)
	// snapshot is the same TPM as state before any reboot: restoring it
	// later is what rolling a VM's TPM state back looks like.
	snapshot := simtest.Clone(t, state)
	sw := simtest.StartTPM(t, state)
	n := openNode(t, sw)
	v := suiteVerifier(t, nil)
	attest := func(n *node, prev *ClockInfo) (*Result, error) {
		t.Helper()
		r := begin(t, v, n, tpm.AlgRSA2048)
		return r.session.Finish(ctx, r.ev, prev)
	}
	first, err := attest(n, nil)
	if err != nil {
		t.Fatalf("first attestation: %v", err)
	}
	if first.Clock.Obfuscated {
		t.Fatalf("the agent's AK is not in the endorsement hierarchy: counters obfuscated (%+v)", first.Clock)
	}
	second, err := attest(n, &first.Clock)
	if err != nil {
		t.Fatalf("second attestation, same boot: %v", err)
	}
	// Real counters: a new AK per attestation, the same counters in one boot.
	if second.Clock.Clock <= first.Clock.Clock || second.Clock.ResetCount != first.Clock.ResetCount ||
		second.Clock.RestartCount != first.Clock.RestartCount || second.Clock.Obfuscated {
		t.Fatalf("within a boot: %+v then %+v, want the same counters and the clock moving", first.Clock, second.Clock)
	}

	tests := []struct {
		name string
		prev func(ClockInfo) ClockInfo
	}{
		{"clock ahead in the same boot", func(c ClockInfo) ClockInfo { c.Clock += 1 << 40; return c }},
		{"resetCount ahead", func(c ClockInfo) ClockInfo { c.ResetCount++; return c }},
		{"restartCount ahead", func(c ClockInfo) ClockInfo { c.RestartCount++; return c }},
	}
	for _, tt := range tests {
		prev := tt.prev(second.Clock)
		if _, err := attest(n, &prev); !errors.Is(err, ErrClock) {
			t.Fatalf("%s: %v, want ErrClock", tt.name, err)
		}
	}

	// A clean reboot: resetCount moves forward by one, accepted.
	if err := sw.Reboot(ctx); err != nil {
		t.Fatalf("Reboot: %v", err)
	}
	n = openNode(t, sw)
	third, err := attest(n, &second.Clock)
	if err != nil {
		t.Fatalf("after a clean reboot: %v", err)
	}
	if third.Clock.ResetCount != second.Clock.ResetCount+1 || third.Clock.RestartCount != 0 {
		t.Fatalf("reboot: counters %+v then %+v, want resetCount+1 and restartCount 0", second.Clock, third.Clock)
	}

	// The TPM state rolled back to before the reboot (same TPM, same EK):
	// its real evidence has a lower resetCount than the stored one.
	sw.Stop()
	restored := simtest.StartTPM(t, snapshot)
	back, err := attest(openNode(t, restored), &third.Clock)
	if !errors.Is(err, ErrClock) || back != nil {
		t.Fatalf("rolled-back TPM state: %v, want ErrClock", err)
	}
	if !strings.Contains(err.Error(), "resetCount went back") {
		t.Fatalf("rolled-back TPM state refused for another reason: %v", err)
	}
	restored.Stop()

	// A power cut leaves the clock unsafe, but resetCount moved forward:
	// the node is admitted at once (a real TPM may stay unsafe for up to
	// ~70 minutes), and the unsafe clock is on record.
	sw = simtest.StartTPM(t, state)
	if err := sw.PowerLoss(ctx); err != nil {
		t.Fatalf("PowerLoss: %v", err)
	}
	n = openNode(t, sw)
	fourth, err := attest(n, &third.Clock)
	if err != nil {
		t.Fatalf("after power loss: %v", err)
	}
	if fourth.Clock.Safe || fourth.Clock.ResetCount <= third.Clock.ResetCount {
		t.Fatalf("after power loss: clock %+v, want unsafe with resetCount above %d", fourth.Clock, third.Clock.ResetCount)
	}
	// An unsafe clock with no reset since the last attestation is refused
	// (forged evidence: TestForgedRefusals, "clock unsafe with no reset").
}

// extend extends the log's digests into the swtpm's SHA-256 PCRs with
// TPM2_PCR_Extend over the same unix socket, as firmware would have.
func extend(t testing.TB, sw *simulator.SWTPM, l *simulator.EventLog) {
	t.Helper()
	path, ok := strings.CutPrefix(sw.Address(), "unix://")
	if !ok {
		t.Fatalf("extend needs a unix socket, got %s", sw.Address())
	}
	tr, err := linuxudstpm.Open(path)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	defer tr.Close()
	for _, e := range l.Extends() {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(e.PCR), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
				{HashAlg: tpm2.TPMAlgSHA256, Digest: e.Digest},
			}},
		}.Execute(tr)
		if err != nil {
			t.Fatalf("PCR_Extend(%d): %v", e.PCR, err)
		}
	}
}

func TestSWTPMEventLog(t *testing.T) {
	ctx := context.Background()
	pcrs := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	for _, secureBoot := range []bool{true, false} {
		t.Run(map[bool]string{true: "secure boot", false: "no secure boot"}[secureBoot], func(t *testing.T) {
			l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: secureBoot})
			if err != nil {
				t.Fatal(err)
			}
			sw := suite.Start(t)
			// Extend before the agent opens the TPM: swtpm serves one
			// client connection at a time.
			extend(t, sw, l)
			logPath := filepath.Join(t.TempDir(), "binary_bios_measurements")
			if err := os.WriteFile(logPath, l.Bytes(), 0o600); err != nil {
				t.Fatal(err)
			}
			n := openNode(t, sw, tpm.WithEventLogPath(logPath))
			want := l.PCRs()
			v := suiteVerifier(t, func(c *Config) {
				c.PCRs = pcrs
				c.RequiredPCRs = map[int][]byte{7: want[7]}
			})

			r := begin(t, v, n, tpm.AlgRSA2048)
			res, err := r.session.Finish(ctx, r.ev, nil)
			if err != nil {
				t.Fatalf("Finish: %v", err)
			}
			if res.SecureBoot == nil || *res.SecureBoot != secureBoot {
				t.Fatalf("SecureBoot = %v, want %v", res.SecureBoot, secureBoot)
			}
			wantSel := "tpm:secure_boot:disabled"
			if secureBoot {
				wantSel = "tpm:secure_boot:enabled"
			}
			if !slices.Contains(res.Selectors(), wantSel) {
				t.Fatalf("selector %s missing: %v", wantSel, res.Selectors())
			}
			for _, i := range []int{0, 4, 7, 8, 9} {
				if !slices.Equal(res.PCRs[i], want[i]) {
					t.Fatalf("PCR %d = %x, log replays to %x", i, res.PCRs[i], want[i])
				}
			}

			tampers := []struct {
				name string
				mod  func(l *simulator.EventLog)
			}{
				{"event data changed", func(l *simulator.EventLog) {
					// SecureBoot is the first PCR 7 event.
					for i, e := range l.Events {
						if e.PCR == 7 {
							l.Events[i].Data[len(e.Data)-1] ^= 1
							return
						}
					}
				}},
				{"event dropped", func(l *simulator.EventLog) {
					for i, e := range l.Events {
						if e.Type == simulator.EvEFIBootServicesApplication {
							l.Events = slices.Delete(l.Events, i, i+1)
							return
						}
					}
				}},
				{"event re-typed", func(l *simulator.EventLog) {
					for i, e := range l.Events {
						if e.PCR == 7 && e.Type == simulator.EvEFIVariableDriverConfig {
							l.Events[i].Type = simulator.EvEFIVariableBoot
							return
						}
					}
				}},
				{"event re-typed to no-action", func(l *simulator.EventLog) {
					for i, e := range l.Events {
						if e.PCR == 9 {
							l.Events[i].Type = simulator.EvNoAction
							return
						}
					}
				}},
			}
			for _, tt := range tampers {
				t.Run(tt.name, func(t *testing.T) {
					bad := l.Clone()
					tt.mod(bad)
					if err := os.WriteFile(logPath, bad.Bytes(), 0o600); err != nil {
						t.Fatal(err)
					}
					r := begin(t, v, n, tpm.AlgRSA2048)
					res, err := r.session.Finish(ctx, r.ev, nil)
					t.Logf("Finish: %v", err)
					if !errors.Is(err, ErrEventLog) || res != nil {
						t.Fatalf("tampered log: %v, want ErrEventLog", err)
					}
				})
			}
			// A node whose PCR 7 differs from the policy is refused.
			other := suiteVerifier(t, func(c *Config) {
				c.PCRs = pcrs
				c.RequiredPCRs = map[int][]byte{7: make([]byte, 32)}
			})
			if err := os.WriteFile(logPath, l.Bytes(), 0o600); err != nil {
				t.Fatal(err)
			}
			r = begin(t, other, n, tpm.AlgRSA2048)
			if _, err := r.session.Finish(ctx, r.ev, nil); !errors.Is(err, ErrPCRPolicy) {
				t.Fatalf("PCR policy: %v, want ErrPCRPolicy", err)
			}
		})
	}
}
