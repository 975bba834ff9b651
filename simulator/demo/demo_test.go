package demo

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/ironroot/ironroot/simulator/simtest"
)

func TestIsDemoSWTPM(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    bool
	}{
		{"demo swtpm", "/usr/bin/swtpm\x00socket\x00--tpm2\x00--tpmstate\x00dir=/d/.demo/tpm\x00", true},
		{"swtpm of another directory", "/usr/bin/swtpm\x00socket\x00--tpmstate\x00dir=/d/other/tpm\x00", false},
		{"directory prefix only", "/usr/bin/swtpm\x00socket\x00--tpmstate\x00dir=/d/.demo-old/tpm\x00", false},
		{"not swtpm", "/bin/sleep\x00dir=/d/.demo/tpm\x00", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isDemoSWTPM([]byte(tt.cmdline), "/d/.demo"); got != tt.want {
				t.Errorf("isDemoSWTPM = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestIntRange(t *testing.T) {
	tests := []struct {
		in   []int
		want string
	}{
		{[]int{0, 1, 2, 3, 4, 5, 6, 7}, "0–7"},
		{[]int{0, 2, 4}, "0,2,4"},
		{[]int{7}, "7"},
		{nil, ""},
	}
	for _, tt := range tests {
		if got := intRange(tt.in); got != tt.want {
			t.Errorf("intRange(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// A swtpm a crashed demo left behind is stopped by the next run (or by
// demo.sh down); a pid file naming another process is only removed.
func TestStopLeftover(t *testing.T) {
	dir := t.TempDir()
	state := simtest.Manufacture(t, simtest.NewCA(t))
	// The state must live under the demo directory for StopLeftover to
	// recognise its swtpm.
	inDemo, err := state.Clone(context.Background(), filepath.Join(dir, "tpm"))
	if err != nil {
		t.Fatal(err)
	}
	sw := simtest.StartTPM(t, inDemo)
	other := simtest.StartTPM(t, state) // not under dir: must survive
	write := func(pid int) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, PIDFile), []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	write(other.PID())
	if err := StopLeftover(dir); err != nil {
		t.Fatal(err)
	}
	if !processAlive(other.PID()) {
		t.Fatal("StopLeftover killed a swtpm outside the demo directory")
	}
	if _, err := os.Stat(filepath.Join(dir, PIDFile)); !os.IsNotExist(err) {
		t.Fatalf("pid file not removed: %v", err)
	}

	write(sw.PID())
	if err := StopLeftover(dir); err != nil {
		t.Fatal(err)
	}
	if processAlive(sw.PID()) {
		t.Fatal("the demo's swtpm still runs")
	}
	// Nothing to do is not an error.
	if err := StopLeftover(dir); err != nil {
		t.Fatal(err)
	}
}
