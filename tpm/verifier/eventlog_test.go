package verifier

import (
	"errors"
	"slices"
	"testing"

	"github.com/ironroot/ironroot/simulator"
)

// quotedPCRs returns the PCR values a TPM that extended l would quote for sel.
func quotedPCRs(l *simulator.EventLog, sel []int) map[int][]byte {
	vals := l.PCRs()
	out := make(map[int][]byte, len(sel))
	for _, i := range sel {
		if d, ok := vals[i]; ok {
			out[i] = d
		} else {
			out[i] = make([]byte, 32)
		}
	}
	return out
}

func TestEventLogSecureBoot(t *testing.T) {
	f := newForge(t)
	for _, enabled := range []bool{true, false} {
		for _, sel := range [][]int{defaultPCRs, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}} {
			l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: enabled})
			if err != nil {
				t.Fatal(err)
			}
			v := forgeVerifier(t, f, func(c *Config) { c.PCRs = sel })
			for i, d := range quotedPCRs(l, sel) {
				f.pcrs[i] = d
			}
			s, _, err := v.Begin(t.Context(), f.identity())
			if err != nil {
				t.Fatal(err)
			}
			nonce := activate(t, s)
			ev := f.evidence(nonce)
			ev.Quote, ev.PCRs = f.quote(nonce, sel)
			ev.EventLog = l.Bytes()
			res, err := s.Finish(t.Context(), ev, nil)
			if err != nil {
				t.Fatalf("secure boot %v, PCRs %v: %v", enabled, sel, err)
			}
			if res.SecureBoot == nil || *res.SecureBoot != enabled {
				t.Fatalf("SecureBoot = %v, want %v", res.SecureBoot, enabled)
			}
			want := "tpm:secure_boot:disabled"
			if enabled {
				want = "tpm:secure_boot:enabled"
			}
			if !slices.Contains(res.Selectors(), want) {
				t.Fatalf("selector %s missing: %v", want, res.Selectors())
			}
		}
	}
}

func TestEventLogWithoutPCR7(t *testing.T) {
	f := newForge(t)
	l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: true})
	if err != nil {
		t.Fatal(err)
	}
	v := forgeVerifier(t, f, func(c *Config) { c.PCRs = []int{0, 4} })
	sb, err := v.checkEventLog(l.Bytes(), quotedPCRs(l, []int{0, 4}))
	if err != nil {
		t.Fatal(err)
	}
	if sb != nil {
		t.Fatalf("Secure Boot state %v derived without PCR 7 quoted", *sb)
	}
}

func TestEventLogTampered(t *testing.T) {
	f := newForge(t)
	sel := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	v := forgeVerifier(t, f, func(c *Config) { c.PCRs = sel })
	find := func(l *simulator.EventLog, pcr int, typ uint32) int {
		for i, e := range l.Events {
			if e.PCR == pcr && e.Type == typ {
				return i
			}
		}
		t.Fatalf("no event of type %#x in PCR %d", typ, pcr)
		return -1
	}
	tests := []struct {
		name   string
		tamper func(l *simulator.EventLog)
	}{
		{"SecureBoot variable flipped to disabled", func(l *simulator.EventLog) {
			i := find(l, 7, simulator.EvEFIVariableDriverConfig)
			l.Events[i].Data[len(l.Events[i].Data)-1] = 0
		}},
		{"kernel path changed with its digest", func(l *simulator.EventLog) {
			i := find(l, 9, simulator.EvIPL)
			l.Measure(9, simulator.EvIPL, []byte("/boot/evil"))
			l.Events[i] = l.Events[len(l.Events)-1]
			l.Events = l.Events[:len(l.Events)-1]
		}},
		{"event dropped", func(l *simulator.EventLog) {
			i := find(l, 4, simulator.EvEFIBootServicesApplication)
			l.Events = slices.Delete(l.Events, i, i+1)
		}},
		{"event appended", func(l *simulator.EventLog) {
			l.Measure(8, simulator.EvIPL, []byte("grub_cmd: extra"))
		}},
		{"application re-typed EV_NO_ACTION", func(l *simulator.EventLog) {
			l.Events[find(l, 4, simulator.EvEFIBootServicesApplication)].Type = simulator.EvNoAction
		}},
		{"SecureBoot variable re-typed", func(l *simulator.EventLog) {
			l.Events[find(l, 7, simulator.EvEFIVariableDriverConfig)].Type = simulator.EvEFIVariableBoot
		}},
		{"event re-typed to an unknown type", func(l *simulator.EventLog) {
			l.Events[find(l, 8, simulator.EvIPL)].Type = 0x1234
		}},
		{"separator data changed", func(l *simulator.EventLog) {
			l.Events[find(l, 4, simulator.EvSeparator)].Data = []byte{1, 0, 0, 0}
		}},
		{"truncated", func(l *simulator.EventLog) {
			l.Events[len(l.Events)-1].Data = nil
			l.Events[len(l.Events)-1].Digest = nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: true})
			if err != nil {
				t.Fatal(err)
			}
			pcrs := quotedPCRs(l, sel)
			if _, err := v.checkEventLog(l.Bytes(), pcrs); err != nil {
				t.Fatalf("untampered log refused: %v", err)
			}
			bad := l.Clone()
			tt.tamper(bad)
			sb, err := v.checkEventLog(bad.Bytes(), pcrs)
			t.Logf("refused: %v", err)
			if !errors.Is(err, ErrEventLog) || sb != nil {
				t.Fatalf("tampered log: state %v, error %v, want ErrEventLog", sb, err)
			}
		})
	}
}
