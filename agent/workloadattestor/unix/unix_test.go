package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ironroot/ironroot/workloadapi"
)

func always() bool { return true }

func selectorStrings(sels []workloadapi.Selector) []string {
	out := make([]string, len(sels))
	for i, s := range sels {
		out[i] = s.String()
	}
	return out
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestParseStatus(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    procStatus
		wantErr bool
	}{
		{
			name: "effective ids and groups",
			in:   "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t100\t101\t100\t100\nGroups:\t4 27 \n",
			want: procStatus{uid: 1001, gid: 101, groups: []uint32{4, 27}},
		},
		{
			name: "no supplementary groups",
			in:   "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
			want: procStatus{},
		},
		{name: "missing gid", in: "Uid:\t0\t0\t0\t0\n", wantErr: true},
		{name: "short uid line", in: "Uid:\t0\nGid:\t0\t0\t0\t0\n", wantErr: true},
		{name: "non-numeric uid", in: "Uid:\t0\tx\t0\t0\nGid:\t0\t0\t0\t0\n", wantErr: true},
		{name: "uid over 32 bits", in: "Uid:\t0\t4294967296\t0\t0\nGid:\t0\t0\t0\t0\n", wantErr: true},
		{name: "bad group", in: "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t1 a\n", wantErr: true},
		{name: "empty", in: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatus([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseStatus error = %v, wantErr %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if got.uid != tt.want.uid || got.gid != tt.want.gid || !slices.Equal(got.groups, tt.want.groups) {
				t.Fatalf("parseStatus = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestAttestSelf(t *testing.T) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	uid, gid := strconv.Itoa(os.Geteuid()), strconv.Itoa(os.Getegid())
	u, err := user.LookupId(uid)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroupId(gid)
	if err != nil {
		t.Fatal(err)
	}
	base := []string{"unix:uid:" + uid, "unix:user:" + u.Username, "unix:gid:" + gid, "unix:group:" + g.Name}
	tests := []struct {
		name    string
		opts    []Option
		want    []string
		notWant []string
	}{
		{
			name:    "ids and names only by default",
			want:    base,
			notWant: []string{"unix:path:" + exe, "unix:sha256:" + fileSHA256(t, exe)},
		},
		{
			name:    "path when asked",
			opts:    []Option{WithPathSelectors(always)},
			want:    append(slices.Clone(base), "unix:path:"+exe),
			notWant: []string{"unix:sha256:" + fileSHA256(t, exe)},
		},
		{
			name: "path and sha256 when asked",
			opts: []Option{WithPathSelectors(always), WithSHA256Selectors(always)},
			want: append(slices.Clone(base), "unix:path:"+exe, "unix:sha256:"+fileSHA256(t, exe)),
		},
		{
			name:    "flags that say no",
			opts:    []Option{WithPathSelectors(func() bool { return false }), WithSHA256Selectors(func() bool { return false })},
			want:    base,
			notWant: []string{"unix:path:" + exe},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sels, err := New(tt.opts...).Attest(context.Background(), int32(os.Getpid()))
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			got := selectorStrings(sels)
			for _, w := range tt.want {
				if !slices.Contains(got, w) {
					t.Errorf("selectors %v lack %q", got, w)
				}
			}
			for _, nw := range tt.notWant {
				if slices.Contains(got, nw) {
					t.Errorf("selectors %v contain %q", got, nw)
				}
			}
			for _, s := range sels {
				if s.Type != SelectorType {
					t.Errorf("selector %v has type %q", s, s.Type)
				}
			}
		})
	}
}

func TestAttestErrors(t *testing.T) {
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		a    *Attestor
		pid  int32
	}{
		{"zero pid", New(), 0},
		{"negative pid", New(), -5},
		{"exited process", New(), int32(dead.Process.Pid)},
		{"executable over size limit", New(WithSHA256Selectors(always), WithSizeLimit(16)), int32(os.Getpid())},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if sels, err := tt.a.Attest(context.Background(), tt.pid); err == nil {
				t.Fatalf("Attest succeeded with %v, want error", selectorStrings(sels))
			}
		})
	}
}

// TestAttestOtherUser runs sleep as nobody and checks that the selectors are
// the process's, not the agent's.
func TestAttestOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("running a process as another user needs root")
	}
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	sleep, err = filepath.EvalSymlinks(sleep)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sleep, "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting sleep as nobody: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	g, err := user.LookupGroupId("65534")
	if err != nil {
		t.Fatal(err)
	}
	a := New(WithPathSelectors(always), WithSHA256Selectors(always))
	sels, err := a.Attest(context.Background(), int32(cmd.Process.Pid))
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	got := selectorStrings(sels)
	for _, w := range []string{
		"unix:uid:65534", "unix:user:nobody", "unix:gid:65534", "unix:group:" + g.Name,
		"unix:path:" + sleep, "unix:sha256:" + fileSHA256(t, sleep),
	} {
		if !slices.Contains(got, w) {
			t.Errorf("selectors %v lack %q", got, w)
		}
	}
	if slices.Contains(got, "unix:uid:0") {
		t.Errorf("selectors %v contain the agent's uid", got)
	}
}

func TestHashCache(t *testing.T) {
	a := New(WithSHA256Selectors(always), WithHashCacheSize(2))
	ctx := context.Background()
	pid := int32(os.Getpid())
	exe, _ := os.Readlink("/proc/self/exe")
	want := "unix:sha256:" + fileSHA256(t, exe)
	for i := range 3 {
		sels, err := a.Attest(ctx, pid)
		if err != nil {
			t.Fatalf("Attest %d: %v", i, err)
		}
		if !slices.Contains(selectorStrings(sels), want) {
			t.Fatalf("Attest %d: no %s", i, want)
		}
	}
	if n := a.HashCount(); n != 1 {
		t.Fatalf("executable hashed %d times for 3 attestations, want 1 (cache hit)", n)
	}

	// A file rewritten in place changes identity and is hashed again.
	dir := t.TempDir()
	f := filepath.Join(dir, "bin")
	if err := os.WriteFile(f, []byte("version one"), 0o755); err != nil {
		t.Fatal(err)
	}
	sum1, err := a.hashExecutable(ctx, f)
	if err != nil {
		t.Fatal(err)
	}
	if sum1 != fileSHA256(t, f) {
		t.Fatalf("hash %s, want %s", sum1, fileSHA256(t, f))
	}
	if err := os.WriteFile(f, []byte("version two"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Make the rewrite visible even on coarse timestamps.
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(f, later, later); err != nil {
		t.Fatal(err)
	}
	sum2, err := a.hashExecutable(ctx, f)
	if err != nil {
		t.Fatal(err)
	}
	if sum2 == sum1 || sum2 != fileSHA256(t, f) {
		t.Fatalf("after rewrite hash %s (before %s), want %s", sum2, sum1, fileSHA256(t, f))
	}
	if n := a.HashCount(); n != 3 {
		t.Fatalf("hash count %d, want 3", n)
	}
	if n := a.hashes.len(); n != 2 {
		t.Fatalf("cache holds %d entries, want the bound 2", n)
	}
	// The test binary was evicted (least recently used): hashed again.
	if _, err := a.Attest(ctx, pid); err != nil {
		t.Fatal(err)
	}
	if n := a.HashCount(); n != 4 {
		t.Fatalf("hash count %d after eviction, want 4", n)
	}
}

func TestHashCanceled(t *testing.T) {
	a := New(WithSHA256Selectors(always))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Attest(ctx, int32(os.Getpid())); err == nil {
		t.Fatal("Attest with a canceled context succeeded")
	}
	if _, err := a.hashExecutable(ctx, "/proc/self/exe"); err == nil {
		t.Fatal("hashing with a canceled context succeeded")
	}
	if n := a.hashes.len(); n != 0 {
		t.Fatalf("canceled hash was cached (%d entries)", n)
	}
}

func TestNamesFromFakeProc(t *testing.T) {
	root := t.TempDir()
	write := func(pid, status string) {
		if err := os.MkdirAll(filepath.Join(root, pid), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, pid, "status"), []byte(status), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// 4242424 has no passwd or group entry: ids only, no names.
	write("7", "Uid:\t1\t4242424\t1\t1\nGid:\t1\t4242424\t1\t1\nGroups:\t0 4242425\n")
	write("8", "Uid:\t1\n")
	rootGroup, err := user.LookupGroupId("0")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		pid     int32
		want    []string
		wantErr bool
	}{
		{
			name: "unknown ids give no name selectors",
			pid:  7,
			want: []string{
				"unix:uid:4242424", "unix:gid:4242424",
				"unix:supplementary_gid:0", "unix:supplementary_group:" + rootGroup.Name,
				"unix:supplementary_gid:4242425",
			},
		},
		{name: "malformed status", pid: 8, wantErr: true},
		{name: "no such process", pid: 9, wantErr: true},
	}
	a := New(withProcRoot(root))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sels, err := a.Attest(context.Background(), tt.pid)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Attest error = %v, wantErr %v", err, tt.wantErr)
			}
			if got := selectorStrings(sels); !tt.wantErr && !slices.Equal(got, tt.want) {
				t.Fatalf("selectors %v, want %v", got, tt.want)
			}
		})
	}
}

// TestHashesRunningBinaryAfterReplacement: replacing the executable's path
// after the process started does not change what is hashed: /proc/<pid>/exe
// is the inode the process runs.
func TestHashesRunningBinaryAfterReplacement(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "workload")
	if err := os.WriteFile(bin, orig, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "60")
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the copied binary: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	origSum := fileSHA256(t, bin)

	// Swap another file in at the same path, as an attacker or an upgrade would.
	impostor := filepath.Join(dir, "impostor")
	if err := os.WriteFile(impostor, []byte("#!/bin/sh\necho not the workload\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(impostor, bin); err != nil {
		t.Fatal(err)
	}

	a := New(WithPathSelectors(always), WithSHA256Selectors(always))
	sels, err := a.Attest(context.Background(), int32(cmd.Process.Pid))
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	got := selectorStrings(sels)
	if !slices.Contains(got, "unix:sha256:"+origSum) {
		t.Fatalf("selectors %v lack the running binary's hash %s", got, origSum)
	}
	if slices.Contains(got, "unix:sha256:"+fileSHA256(t, bin)) {
		t.Fatalf("selectors %v hash the replacement file", got)
	}
	if !slices.Contains(got, "unix:path:"+bin+" (deleted)") {
		t.Fatalf("selectors %v lack the replaced path marked (deleted)", got)
	}
}

func TestNameCacheTTL(t *testing.T) {
	now := time.Unix(1000, 0)
	a := New(WithNameCacheTTL(30 * time.Second))
	a.now = func() time.Time { return now }
	calls := 0
	lookup := func(id string) (string, error) {
		calls++
		return "name-" + id, nil
	}
	steps := []struct {
		advance   time.Duration
		id        uint32
		wantCalls int
	}{
		{0, 7, 1},                // miss
		{10 * time.Second, 7, 1}, // hit within TTL
		{0, 8, 2},                // other ID: miss
		{25 * time.Second, 7, 3}, // 35 s after the first lookup: expired
		{29 * time.Second, 7, 3}, // hit again
	}
	for i, s := range steps {
		now = now.Add(s.advance)
		if got := a.lookupName(a.users, s.id, lookup); got != "name-"+strconv.Itoa(int(s.id)) {
			t.Fatalf("step %d: name %q", i, got)
		}
		if calls != s.wantCalls {
			t.Fatalf("step %d: %d lookups, want %d", i, calls, s.wantCalls)
		}
	}
}
