//go:build cgo

package hsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// HSM is one logged-in token with a bounded pool of sessions. It is safe for
// concurrent use. Close it when done.
type HSM struct {
	mod        *Module
	ownsModule bool
	cfg        config
	log        *slog.Logger
	uri        URI // as opened, without the pin-value
	pin        string

	state atomic.Pointer[tokenState]
	size  int
	// slots bounds the sessions in use: one token per session lent out.
	slots chan struct{}
	// idle holds open sessions not in use, most recently used last: reusing
	// the warmest session first keeps few sessions open.
	idleMu sync.Mutex
	idle   []*session

	closed    chan struct{}
	closeOnce sync.Once
	closeErr  error

	// recMu serialises recovery and guards the fields below it.
	recMu        sync.Mutex
	lastRecovery time.Time
	pinErr       error
	anchor       pkcs11.SessionHandle
	anchorOpen   bool

	// objMu serialises GenerateKey and DestroyKey so the "never overwrite"
	// check and the creation are atomic within this process.
	objMu sync.Mutex

	inUse      atomic.Int64
	recoveries atomic.Uint64
	// pinFailed is set with pinErr: the token refused the PIN, so every
	// operation fails at once instead of running without a login.
	pinFailed atomic.Bool
}

// tokenState is what sessions are opened against. gen changes on every
// recovery: sessions and key handles of an older generation are discarded.
type tokenState struct {
	gen  uint64
	slot uint
}

// session is a pooled PKCS#11 session; open is false once it is closed.
type session struct {
	h    pkcs11.SessionHandle
	gen  uint64
	open bool
}

// Open loads the module named by the URI's module-path, finds the token by
// label (token=) or serial, logs in once with the URI's PIN (or WithPIN) and
// returns the token with its session pool. The returned HSM owns the module
// and finalises it on Close (or, if other tokens were opened through
// h.Module(), when the last of them is closed); to open several tokens of one
// module in a process use LoadModule and Module.Open.
func Open(ctx context.Context, uri string, opts ...Option) (*HSM, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if u.ModulePath == "" {
		return nil, errors.New("opening PKCS#11 token: the URI has no module-path")
	}
	m, err := LoadModule(ctx, u.ModulePath)
	if err != nil {
		return nil, err
	}
	h, err := m.OpenURI(ctx, u, opts...)
	if err != nil {
		if cerr := m.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	h.ownsModule = true
	return h, nil
}

// Open opens the token the URI names through this module. A module-path in
// the URI must be this module's.
func (m *Module) Open(ctx context.Context, uri string, opts ...Option) (*HSM, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return m.OpenURI(ctx, u, opts...)
}

// OpenURI is Open with a parsed URI.
func (m *Module) OpenURI(ctx context.Context, u *URI, opts ...Option) (*HSM, error) {
	if u.ModulePath != "" && u.ModulePath != m.path {
		return nil, fmt.Errorf("opening PKCS#11 token: URI module-path %s is not the loaded module %s", u.ModulePath, m.path)
	}
	if u.Token == "" && u.Serial == "" {
		return nil, errors.New("opening PKCS#11 token: the URI must select the token by token= (label) or serial= " +
			"(slot IDs are not stable)")
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("opening PKCS#11 token: %w", err)
	}
	cfg := newConfig(opts)
	pin := cfg.pin
	if !cfg.pinSet {
		p, err := u.PIN()
		if err != nil {
			return nil, fmt.Errorf("opening PKCS#11 token %s: %w", tokenName(u), err)
		}
		pin = p
	}
	if err := m.acquire(); err != nil {
		return nil, err
	}
	h := &HSM{mod: m, cfg: cfg, log: cfg.logger, uri: *u, pin: pin, closed: make(chan struct{})}
	h.uri.pinValue = ""
	h.uri.ModulePath = m.path
	if err := h.open(); err != nil {
		return nil, errors.Join(err, m.release())
	}
	h.log.Info("opened PKCS#11 token", "token", tokenName(u), "module", m.path, "sessions", h.size)
	return h, nil
}

// tokenName names the token for messages: its label, else its serial.
func tokenName(u *URI) string {
	if u.Token != "" {
		return fmt.Sprintf("%q", u.Token)
	}
	return "serial " + fmt.Sprintf("%q", u.Serial)
}

func (h *HSM) open() error {
	slot, info, err := h.findSlot()
	if err != nil {
		return err
	}
	size := h.cfg.maxSessions
	if size == 0 {
		size = h.uri.MaxSessions
	}
	if size == 0 {
		size = DefaultMaxSessions
	}
	if max := info.MaxSessionCount; max != pkcs11.CK_EFFECTIVELY_INFINITE && max != pkcs11.CK_UNAVAILABLE_INFORMATION {
		if max < 2 {
			return fmt.Errorf("opening PKCS#11 token %s: the token allows %d session(s); at least 2 are needed "+
				"(one holds the login)", tokenName(&h.uri), max)
		}
		if size > int(max)-1 {
			size = int(max) - 1
		}
	}
	h.size = size
	h.slots = make(chan struct{}, size)
	h.state.Store(&tokenState{gen: 1, slot: slot})
	h.recMu.Lock()
	defer h.recMu.Unlock()
	return h.openAnchor(slot)
}

// findSlot finds the one token matching the URI's token attributes.
func (h *HSM) findSlot() (uint, pkcs11.TokenInfo, error) {
	slots, err := h.mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("listing PKCS#11 slots: %w", p11err("C_GetSlotList", err))
	}
	var (
		found []uint
		info  pkcs11.TokenInfo
	)
	for _, s := range slots {
		ti, err := h.mod.ctx.GetTokenInfo(s)
		if err != nil {
			// A token vanishing under us (SoftHSM reports CKR_GENERAL_ERROR)
			// just doesn't match.
			continue
		}
		if h.matches(s, ti) {
			found = append(found, s)
			info = ti
		}
	}
	switch len(found) {
	case 0:
		return 0, info, fmt.Errorf("opening PKCS#11 token %s in %s: %w", tokenName(&h.uri), h.mod.path, ErrTokenNotFound)
	case 1:
		return found[0], info, nil
	}
	return 0, info, fmt.Errorf("opening PKCS#11 token %s: %d tokens match; add serial= to the URI", tokenName(&h.uri), len(found))
}

func (h *HSM) matches(slot uint, ti pkcs11.TokenInfo) bool {
	u := &h.uri
	return (u.Token == "" || u.Token == ti.Label) &&
		(u.Serial == "" || u.Serial == ti.SerialNumber) &&
		(u.Manufacturer == "" || u.Manufacturer == ti.ManufacturerID) &&
		(u.Model == "" || u.Model == ti.Model) &&
		(u.SlotID == nil || *u.SlotID == slot)
}

// openAnchor opens the session that holds the login and logs in on it. The
// login belongs to the application, not the session, but ends when the last
// session closes; the anchor keeps it alive while pool sessions come and go.
// Called with recMu held.
func (h *HSM) openAnchor(slot uint) error {
	sh, err := h.mod.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("opening a session on PKCS#11 token %s: %w", tokenName(&h.uri), p11err("C_OpenSession", err))
	}
	if h.pin != "" {
		err := h.mod.ctx.Login(sh, pkcs11.CKU_USER, h.pin)
		if err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			_ = h.mod.ctx.CloseSession(sh)
			perr := p11err("C_Login", err)
			if classify(err) == classPIN {
				// Remember it: a wrong PIN is never tried again.
				h.pinErr = perr
				h.pinFailed.Store(true)
			}
			return fmt.Errorf("logging in to PKCS#11 token %s: %w", tokenName(&h.uri), perr)
		}
	}
	if h.anchorOpen {
		_ = h.mod.ctx.CloseSession(h.anchor)
	}
	h.anchor, h.anchorOpen = sh, true
	return nil
}

// acquire takes a session from the pool, opening one if none is idle. On a
// C_OpenSession failure it returns the (unopened) session with the error; the
// caller must release it either way (unless it is nil).
func (h *HSM) acquire(ctx context.Context) (*session, error) {
	select {
	case <-h.closed:
		return nil, ErrClosed
	default:
	}
	select {
	case h.slots <- struct{}{}:
	case <-h.closed:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for one of %d PKCS#11 sessions: %w", h.size, ctx.Err())
	}
	select {
	case <-h.closed:
		<-h.slots
		return nil, ErrClosed
	default:
	}
	h.inUse.Add(1)
	st := h.state.Load()
	h.idleMu.Lock()
	var s *session
	if n := len(h.idle); n > 0 {
		s = h.idle[n-1]
		h.idle = h.idle[:n-1]
	}
	h.idleMu.Unlock()
	if s != nil && s.gen != st.gen {
		_ = h.mod.ctx.CloseSession(s.h) // from before a recovery: probably dead already
		s = nil
	}
	if s == nil {
		s = &session{gen: st.gen}
		sh, err := h.mod.ctx.OpenSession(st.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return s, p11err("C_OpenSession", err)
		}
		s.h, s.open = sh, true
	}
	return s, nil
}

// release returns s to the pool; drop closes its PKCS#11 session instead, so
// a failed session is never handed out again.
func (h *HSM) release(s *session, drop bool) {
	if s.open {
		if drop {
			_ = h.mod.ctx.CloseSession(s.h)
			s.open = false
		} else {
			h.idleMu.Lock()
			h.idle = append(h.idle, s)
			h.idleMu.Unlock()
		}
	}
	h.inUse.Add(-1)
	<-h.slots
}

// do runs fn on a pooled session. When fn (or opening the session) fails in
// a recoverable way, the session is dropped, the token recovered and fn run
// once more on a fresh session.
func (h *HSM) do(ctx context.Context, fn func(*session) error) error {
	if h.pinFailed.Load() {
		h.recMu.Lock()
		err := h.pinErr
		h.recMu.Unlock()
		return fmt.Errorf("not using PKCS#11 token %s: it refused the PIN earlier: %w", tokenName(&h.uri), err)
	}
	for attempt := 0; ; attempt++ {
		s, err := h.acquire(ctx)
		if s == nil {
			return err
		}
		if err == nil {
			err = fn(s)
		}
		class := classify(err)
		if err == nil || !class.recoverable() {
			h.release(s, false)
			return err
		}
		gen := s.gen // s may be reused by others after release
		h.release(s, true)
		if attempt > 0 {
			return err
		}
		if rerr := h.recover(gen, err); rerr != nil {
			return rerr
		}
	}
}

// recover re-finds the token, opens a new login session and logs in again
// after a failure on a session of generation failedGen. Sessions and key
// handles of older generations are then discarded on use. It does nothing if
// another goroutine already recovered since, refuses after a PIN error, and
// runs at most once per relogin interval.
func (h *HSM) recover(failedGen uint64, cause error) error {
	h.recMu.Lock()
	defer h.recMu.Unlock()
	if h.pinErr != nil {
		return fmt.Errorf("%w (not recovering: the token refused the PIN earlier: %w)", cause, h.pinErr)
	}
	st := h.state.Load()
	if st.gen != failedGen {
		return nil
	}
	if !h.lastRecovery.IsZero() && time.Since(h.lastRecovery) < h.cfg.reloginInterval {
		return fmt.Errorf("%w (not recovering: last recovery of token %s was less than %s ago)",
			cause, tokenName(&h.uri), h.cfg.reloginInterval)
	}
	h.lastRecovery = time.Now()
	h.recoveries.Add(1)
	h.log.Warn("PKCS#11 token failed; re-opening sessions and logging in again",
		"token", h.uri.Token, "serial", h.uri.Serial, "error", cause)
	if isCode(cause, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		if err := h.mod.reinitialize(); err != nil {
			return fmt.Errorf("%w (recovery failed: %w)", cause, err)
		}
	}
	slot, _, err := h.findSlot()
	if err != nil {
		return fmt.Errorf("%w (recovery failed: %w)", cause, err)
	}
	// The new generation starts only once logged in again, so no session of
	// it can run before the login; old sessions go either way.
	err = h.openAnchor(slot)
	h.state.Store(&tokenState{gen: st.gen + 1, slot: slot})
	if err != nil {
		return fmt.Errorf("%w (recovery failed: %w)", cause, err)
	}
	h.log.Info("PKCS#11 token recovered", "token", h.uri.Token, "serial", h.uri.Serial)
	return nil
}

// URI returns the token's URI, without any pin-value.
func (h *HSM) URI() string { return h.uri.String() }

// Module returns the module the token was opened through.
func (h *HSM) Module() *Module { return h.mod }

// PoolStats describes the session pool.
type PoolStats struct {
	// Size is the maximum number of operation sessions.
	Size int
	// InUse is the number of sessions currently lent out.
	InUse int
	// Recoveries counts recoveries (re-login and new sessions) so far.
	Recoveries uint64
}

// Stats returns the session pool's statistics.
func (h *HSM) Stats() PoolStats {
	return PoolStats{Size: h.size, InUse: int(h.inUse.Load()), Recoveries: h.recoveries.Load()}
}

// Close waits for operations in flight, closes every session (without
// logging out: that would log out other users of the token in this process)
// and, if the HSM was made by Open, finalises the module once no other token
// opened through it is open. Operations after Close fail with ErrClosed.
func (h *HSM) Close() error {
	h.closeOnce.Do(func() {
		close(h.closed)
		// Taking every slot waits for the operations in flight.
		for range h.size {
			h.slots <- struct{}{}
		}
		h.idleMu.Lock()
		for _, s := range h.idle {
			_ = h.mod.ctx.CloseSession(s.h)
		}
		h.idle = nil
		h.idleMu.Unlock()
		h.recMu.Lock()
		if h.anchorOpen {
			_ = h.mod.ctx.CloseSession(h.anchor)
			h.anchorOpen = false
		}
		h.recMu.Unlock()
		h.closeErr = h.mod.release()
		if h.ownsModule {
			h.closeErr = h.mod.closeWhenUnused()
		}
	})
	return h.closeErr
}
