// Package unix is the agent's unix workload attestor: it describes a local
// process by the selectors unix:uid, unix:user, unix:gid, unix:group,
// unix:supplementary_gid, unix:supplementary_group and, when some
// registration entry needs them, unix:path and unix:sha256 of its
// executable. It implements workloadapi.Attestor.
//
// The attestor only reads /proc. The caller is responsible for checking
// afterwards that the PID still names the process it meant
// (workloadapi.Caller.Verify does this for Workload API connections).
package unix

import (
	"bufio"
	"bytes"
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	xunix "golang.org/x/sys/unix"

	"github.com/ironroot/ironroot/workloadapi"
)

// SelectorType is the Type of every selector this attestor produces.
const SelectorType = "unix"

// Defaults for the options.
const (
	// DefaultHashCacheSize is how many executable hashes are kept.
	DefaultHashCacheSize = 1024
	// DefaultNameCacheTTL is how long a user or group name lookup is kept.
	DefaultNameCacheTTL = 30 * time.Second
	// DefaultSizeLimit is the largest executable hashed (bytes).
	DefaultSizeLimit = 512 << 20
)

// maxNameCacheEntries bounds the name caches; they are cleared when full.
const maxNameCacheEntries = 4096

// Option configures an Attestor.
type Option func(*Attestor)

// WithPathSelectors makes Attest add unix:path (the executable's path) when
// enabled returns true. The agent passes a function that reports whether any
// registration entry uses unix:path, so that nobody pays for it otherwise.
func WithPathSelectors(enabled func() bool) Option {
	return func(a *Attestor) { a.wantPath = enabled }
}

// WithSHA256Selectors makes Attest add unix:sha256 (hex SHA-256 of the
// executable) when enabled returns true, typically when some registration
// entry uses unix:sha256.
func WithSHA256Selectors(enabled func() bool) Option {
	return func(a *Attestor) { a.wantHash = enabled }
}

// WithSizeLimit sets the largest executable that is hashed; a larger one
// fails attestation while unix:sha256 is wanted. 0 means no limit.
func WithSizeLimit(n int64) Option {
	return func(a *Attestor) {
		if n >= 0 {
			a.sizeLimit = n
		}
	}
}

// WithHashCacheSize sets how many executable hashes are cached, keyed by
// file identity (device, inode, size, mtime, ctime).
func WithHashCacheSize(n int) Option {
	return func(a *Attestor) {
		if n > 0 {
			a.hashes.max = n
		}
	}
}

// WithNameCacheTTL sets how long user and group name lookups are cached.
func WithNameCacheTTL(d time.Duration) Option {
	return func(a *Attestor) {
		if d >= 0 {
			a.nameTTL = d
		}
	}
}

// WithLogger sets the logger; the default discards.
func WithLogger(l *slog.Logger) Option {
	return func(a *Attestor) {
		if l != nil {
			a.log = l
		}
	}
}

// withProcRoot points the attestor at another /proc (tests).
func withProcRoot(dir string) Option { return func(a *Attestor) { a.proc = dir } }

// Attestor is the unix workload attestor. It is safe for concurrent use.
type Attestor struct {
	proc      string
	wantPath  func() bool
	wantHash  func() bool
	sizeLimit int64
	nameTTL   time.Duration
	log       *slog.Logger
	now       func() time.Time

	hashes   hashCache
	hashRuns atomic.Int64 // executables actually read and hashed

	namesMu sync.Mutex
	users   map[uint32]cachedName
	groups  map[uint32]cachedName
}

type cachedName struct {
	name    string // "" when the ID has no name
	expires time.Time
}

var _ workloadapi.Attestor = (*Attestor)(nil)

// New returns a unix attestor.
func New(opts ...Option) *Attestor {
	a := &Attestor{
		proc:      "/proc",
		sizeLimit: DefaultSizeLimit,
		nameTTL:   DefaultNameCacheTTL,
		log:       slog.New(slog.DiscardHandler),
		now:       time.Now,
		hashes:    hashCache{max: DefaultHashCacheSize},
		users:     make(map[uint32]cachedName),
		groups:    make(map[uint32]cachedName),
	}
	for _, o := range opts {
		o(a)
	}
	return a
}

// Attest returns the selectors of process pid.
func (a *Attestor) Attest(ctx context.Context, pid int32) ([]workloadapi.Selector, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("attesting workload: invalid pid %d", pid)
	}
	dir := a.proc + "/" + strconv.Itoa(int(pid))
	st, err := readStatus(dir + "/status")
	if err != nil {
		return nil, fmt.Errorf("attesting workload %d: reading process status: %w", pid, err)
	}
	sel := func(v string) workloadapi.Selector { return workloadapi.Selector{Type: SelectorType, Value: v} }
	out := make([]workloadapi.Selector, 0, 8+2*len(st.groups))
	out = append(out, sel("uid:"+strconv.FormatUint(uint64(st.uid), 10)))
	if name := a.userName(st.uid); name != "" {
		out = append(out, sel("user:"+name))
	}
	out = append(out, sel("gid:"+strconv.FormatUint(uint64(st.gid), 10)))
	if name := a.groupName(st.gid); name != "" {
		out = append(out, sel("group:"+name))
	}
	for _, g := range st.groups {
		out = append(out, sel("supplementary_gid:"+strconv.FormatUint(uint64(g), 10)))
		if name := a.groupName(g); name != "" {
			out = append(out, sel("supplementary_group:"+name))
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("attesting workload %d: %w", pid, err)
	}
	if a.wantPath != nil && a.wantPath() {
		path, err := os.Readlink(dir + "/exe")
		if err != nil {
			return nil, fmt.Errorf("attesting workload %d: reading executable path: %w", pid, err)
		}
		out = append(out, sel("path:"+path))
	}
	if a.wantHash != nil && a.wantHash() {
		sum, err := a.hashExecutable(ctx, dir+"/exe")
		if err != nil {
			return nil, fmt.Errorf("attesting workload %d: hashing executable: %w", pid, err)
		}
		out = append(out, sel("sha256:"+sum))
	}
	return out, nil
}

// HashCount returns how many executables were read and hashed (cache
// misses), for tests and metrics.
func (a *Attestor) HashCount() int64 { return a.hashRuns.Load() }

type procStatus struct {
	uid, gid uint32
	groups   []uint32
}

// readStatus reads the effective uid and gid and the supplementary groups
// from /proc/<pid>/status.
func readStatus(path string) (procStatus, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return procStatus{}, err
	}
	return parseStatus(b)
}

func parseStatus(b []byte) (procStatus, error) {
	var st procStatus
	var haveUID, haveGID bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(val)
		switch key {
		case "Uid", "Gid":
			// real, effective, saved, filesystem: selectors use effective.
			if len(fields) < 2 {
				return st, fmt.Errorf("malformed %s line", key)
			}
			v, err := strconv.ParseUint(fields[1], 10, 32)
			if err != nil {
				return st, fmt.Errorf("malformed %s line: %w", key, err)
			}
			if key == "Uid" {
				st.uid, haveUID = uint32(v), true
			} else {
				st.gid, haveGID = uint32(v), true
			}
		case "Groups":
			for _, f := range fields {
				v, err := strconv.ParseUint(f, 10, 32)
				if err != nil {
					return st, fmt.Errorf("malformed Groups line: %w", err)
				}
				st.groups = append(st.groups, uint32(v))
			}
		}
	}
	if err := sc.Err(); err != nil {
		return st, err
	}
	if !haveUID || !haveGID {
		return st, errors.New("no Uid or Gid line")
	}
	return st, nil
}

func (a *Attestor) userName(uid uint32) string {
	return a.lookupName(a.users, uid, func(id string) (string, error) {
		u, err := user.LookupId(id)
		if err != nil {
			return "", err
		}
		return u.Username, nil
	})
}

func (a *Attestor) groupName(gid uint32) string {
	return a.lookupName(a.groups, gid, func(id string) (string, error) {
		g, err := user.LookupGroupId(id)
		if err != nil {
			return "", err
		}
		return g.Name, nil
	})
}

// lookupName resolves an ID through NSS, cached for nameTTL (also when the
// ID has no name, so unknown IDs do not hit NSS on every call).
func (a *Attestor) lookupName(cache map[uint32]cachedName, id uint32, lookup func(string) (string, error)) string {
	now := a.now()
	a.namesMu.Lock()
	if c, ok := cache[id]; ok && now.Before(c.expires) {
		a.namesMu.Unlock()
		return c.name
	}
	a.namesMu.Unlock()

	name, err := lookup(strconv.FormatUint(uint64(id), 10))
	if err != nil {
		var uu user.UnknownUserIdError
		var ug user.UnknownGroupIdError
		if !errors.As(err, &uu) && !errors.As(err, &ug) {
			a.log.Warn("looking up user or group name", "id", id, "error", err)
		}
		name = ""
	}
	a.namesMu.Lock()
	defer a.namesMu.Unlock()
	if len(cache) >= maxNameCacheEntries {
		clear(cache)
	}
	cache[id] = cachedName{name: name, expires: now.Add(a.nameTTL)}
	return name
}

// fileID identifies one version of a file: any rewrite changes size, mtime
// or ctime, and replacing it changes the inode.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // nanoseconds
}

// hashExecutable hashes the file open as /proc/<pid>/exe. Opening that link
// opens the very inode the process runs, even if its path was replaced.
func (a *Attestor) hashExecutable(ctx context.Context, exe string) (string, error) {
	f, err := os.Open(exe)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var st xunix.Stat_t
	if err := xunix.Fstat(int(f.Fd()), &st); err != nil {
		return "", fmt.Errorf("stat: %w", err)
	}
	id := fileID{
		dev: st.Dev, ino: st.Ino, size: st.Size,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(),
	}
	if sum, ok := a.hashes.get(id); ok {
		return sum, nil
	}
	if a.sizeLimit > 0 && st.Size > a.sizeLimit {
		return "", fmt.Errorf("executable is %d bytes, over the %d byte limit", st.Size, a.sizeLimit)
	}
	a.hashRuns.Add(1)
	h := sha256.New()
	var r io.Reader = f
	if a.sizeLimit > 0 {
		r = io.LimitReader(f, a.sizeLimit+1)
	}
	n, err := io.Copy(h, ctxReader{ctx: ctx, r: r})
	if err != nil {
		return "", fmt.Errorf("reading: %w", err)
	}
	if a.sizeLimit > 0 && n > a.sizeLimit {
		return "", fmt.Errorf("executable grew over the %d byte limit while hashing", a.sizeLimit)
	}
	// The file changed while we read it: do not cache a hash of a mix.
	var after xunix.Stat_t
	if err := xunix.Fstat(int(f.Fd()), &after); err != nil {
		return "", fmt.Errorf("stat: %w", err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if after.Size == st.Size && after.Mtim.Nano() == id.mtime && after.Ctim.Nano() == id.ctime {
		a.hashes.put(id, sum)
	}
	return sum, nil
}

// ctxReader stops a long hash when the RPC is abandoned.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// hashCache is a bounded LRU of executable hashes by file identity.
type hashCache struct {
	mu    sync.Mutex
	max   int
	ll    *list.List
	items map[fileID]*list.Element
}

type hashEntry struct {
	id  fileID
	sum string
}

func (c *hashCache) get(id fileID) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[id]
	if !ok {
		return "", false
	}
	c.ll.MoveToFront(e)
	return e.Value.(*hashEntry).sum, true
}

func (c *hashCache) put(id fileID, sum string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.items == nil {
		c.items = make(map[fileID]*list.Element)
		c.ll = list.New()
	}
	if e, ok := c.items[id]; ok {
		e.Value.(*hashEntry).sum = sum
		c.ll.MoveToFront(e)
		return
	}
	c.items[id] = c.ll.PushFront(&hashEntry{id: id, sum: sum})
	for c.ll.Len() > c.max {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.items, last.Value.(*hashEntry).id)
	}
}

func (c *hashCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.items)
}
