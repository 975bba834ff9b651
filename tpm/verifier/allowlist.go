package verifier

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// AllowList admits EKs by the hash of their public key (lowercase hex SHA-256
// of the PKIX DER encoding, the same hash as in the agent's SPIFFE ID).
//
// Implementations must fail closed: any error means the EK is not admitted,
// and the verifier treats an error exactly like a "no".
type AllowList interface {
	Allowed(ctx context.Context, ekHash string) (bool, error)
}

// FileAllowList returns an AllowList backed by a file holding one EK hash per
// line. Blank lines and everything after '#' are ignored. The file is checked
// with a stat on every lookup and re-read when its size, modification time or
// inode changed, so edits take effect without a restart.
//
// Any error denies: a missing or unreadable file, a path under a regular file
// (ENOTDIR), or a single unparsable line admits nobody until it is fixed.
func FileAllowList(path string) AllowList {
	return &fileAllowList{path: path}
}

type fileAllowList struct {
	path string

	mu     sync.Mutex
	stamp  fileStamp
	hashes map[string]struct{}
}

type fileStamp struct {
	size  int64
	mtime time.Time
	ino   uint64
	valid bool
}

// maxAllowListSize bounds what is read into memory: a million hashes.
const maxAllowListSize = 80 << 20

func (f *fileAllowList) Allowed(ctx context.Context, ekHash string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	set, err := f.load()
	if err != nil {
		return false, err
	}
	_, ok := set[strings.ToLower(ekHash)]
	return ok, nil
}

func (f *fileAllowList) load() (map[string]struct{}, error) {
	fi, err := os.Stat(f.path)
	if err != nil {
		return nil, fmt.Errorf("reading EK allow-list: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("reading EK allow-list %s: not a regular file", f.path)
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime(), ino: inode(fi), valid: true}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stamp == st && f.hashes != nil {
		return f.hashes, nil
	}
	// A failed re-read drops the cached set: a broken file admits nobody.
	f.stamp, f.hashes = fileStamp{}, nil
	file, err := os.Open(f.path)
	if err != nil {
		return nil, fmt.Errorf("reading EK allow-list: %w", err)
	}
	defer file.Close()
	data, err := io.ReadAll(io.LimitReader(file, maxAllowListSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading EK allow-list %s: %w", f.path, err)
	}
	if len(data) > maxAllowListSize {
		return nil, fmt.Errorf("reading EK allow-list %s: larger than %d bytes", f.path, maxAllowListSize)
	}
	set, err := ParseAllowList(data)
	if err != nil {
		return nil, fmt.Errorf("parsing EK allow-list %s: %w", f.path, err)
	}
	f.stamp, f.hashes = st, set
	return set, nil
}

// ParseAllowList parses allow-list file contents: one EK hash (64 hex
// digits, any case) per line, '#' starts a comment. It returns the set of
// lowercase hashes, or an error naming the first bad line.
func ParseAllowList(data []byte) (map[string]struct{}, error) {
	set := make(map[string]struct{})
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if err := checkHash(line); err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		set[strings.ToLower(line)] = struct{}{}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return set, nil
}

func checkHash(s string) error {
	if len(s) != 64 {
		return fmt.Errorf("EK hash must be 64 hex digits, got %d characters", len(s))
	}
	if _, err := hex.DecodeString(s); err != nil {
		return fmt.Errorf("EK hash is not hexadecimal")
	}
	return nil
}

// StaticAllowList returns an AllowList holding the given EK hashes, for
// configuration that carries the hashes inline.
func StaticAllowList(hashes ...string) (AllowList, error) {
	set := make(map[string]struct{}, len(hashes))
	for i, h := range hashes {
		h = strings.TrimSpace(h)
		if err := checkHash(h); err != nil {
			return nil, fmt.Errorf("allow-list entry %d: %w", i, err)
		}
		set[strings.ToLower(h)] = struct{}{}
	}
	return staticAllowList(set), nil
}

type staticAllowList map[string]struct{}

func (s staticAllowList) Allowed(ctx context.Context, ekHash string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	_, ok := s[strings.ToLower(ekHash)]
	return ok, nil
}
