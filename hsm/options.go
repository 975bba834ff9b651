package hsm

import (
	"log/slog"
	"time"
)

// Defaults for Open.
const (
	// DefaultMaxSessions caps the session pool when neither WithMaxSessions
	// nor the URI's max-sessions says otherwise (the token's own limit is
	// also honoured).
	DefaultMaxSessions = 8
	// DefaultReloginInterval is the least time between two recoveries
	// (re-open, re-login) of one token.
	DefaultReloginInterval = 5 * time.Second
	// DefaultSignTimeout bounds how long crypto.Signer.Sign, which has no
	// context, waits for a free session.
	DefaultSignTimeout = 30 * time.Second
)

// Option configures Open.
type Option func(*config)

type config struct {
	maxSessions     int
	allowImported   bool
	logger          *slog.Logger
	reloginInterval time.Duration
	pin             string
	pinSet          bool
	signTimeout     time.Duration
}

func newConfig(opts []Option) config {
	c := config{
		reloginInterval: DefaultReloginInterval,
		signTimeout:     DefaultSignTimeout,
	}
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	if c.logger == nil {
		c.logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// WithMaxSessions caps the number of PKCS#11 sessions used for operations
// (one more session holds the login). It overrides the URI's max-sessions.
// Values below 1 are ignored.
func WithMaxSessions(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.maxSessions = n
		}
	}
}

// WithAllowImportedKeys lets FindKey return keys whose attributes show they
// were not generated on the token or were once extractable. Only for keys an
// operator deliberately imported, e.g. during a migration.
func WithAllowImportedKeys() Option {
	return func(c *config) { c.allowImported = true }
}

// WithLogger sets the logger for recovery and lifecycle events. PINs are never
// logged.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) {
		if l != nil {
			c.logger = l
		}
	}
}

// WithReloginInterval sets the least time between two recoveries (new
// sessions, login, re-finding key handles) of the token. Within it a further
// failure is returned to the caller instead of recovered from. 0 disables the
// limit.
func WithReloginInterval(d time.Duration) Option {
	return func(c *config) {
		if d >= 0 {
			c.reloginInterval = d
		}
	}
}

// WithPIN supplies the user PIN, overriding the URI's pin-source or
// pin-value, e.g. when it comes from an environment variable.
func WithPIN(pin string) Option {
	return func(c *config) { c.pin, c.pinSet = pin, true }
}

// WithSignTimeout bounds how long Key.Sign (crypto.Signer, which has no
// context) waits for a session. Key.SignContext uses its context instead.
func WithSignTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.signTimeout = d
		}
	}
}
