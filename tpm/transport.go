package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

const (
	// responseHeaderSize is tag (2) + responseSize (4) + responseCode (4).
	responseHeaderSize = 10
	// maxResponseSize bounds what a peer can make us allocate; real TPM
	// responses are at most a few KiB (TPM_PT_MAX_RESPONSE_SIZE).
	maxResponseSize = 64 << 10
	// defaultCommandTimeout bounds one command on a socket when the
	// operation's context has no deadline.
	defaultCommandTimeout = 2 * time.Minute
)

// dialFunc opens a connection to a swtpm data channel.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// conn is the transport under a TPM: go-tpm's Send plus the operation's
// context and the end of an operation.
type conn interface {
	transport.TPM
	// begin binds the context of the operation about to run.
	begin(ctx context.Context)
	// end is called when an operation's command sequence is over.
	end()
	io.Closer
}

// parseAddress splits a TPM address into a network ("unix", "tcp" or
// "device") and an address.
func parseAddress(address string) (network, addr string, err error) {
	switch {
	case address == "":
		return "", "", errors.New("empty TPM address: want a device path, unix:///path or tcp://host:port")
	case strings.HasPrefix(address, "/"):
		return "device", address, nil
	}
	u, err := url.Parse(address)
	if err != nil {
		return "", "", fmt.Errorf("parsing TPM address %q: %w", address, err)
	}
	switch u.Scheme {
	case "unix":
		if u.Host != "" || u.Path == "" || !strings.HasPrefix(u.Path, "/") {
			return "", "", fmt.Errorf("TPM address %q: want unix:///absolute/path", address)
		}
		return "unix", u.Path, nil
	case "tcp":
		host, port, err := net.SplitHostPort(u.Host)
		if err != nil || host == "" || port == "" || (u.Path != "" && u.Path != "/") {
			return "", "", fmt.Errorf("TPM address %q: want tcp://host:port", address)
		}
		return "tcp", u.Host, nil
	default:
		return "", "", fmt.Errorf("TPM address %q: unsupported scheme %q (want a device path, unix:// or tcp://)", address, u.Scheme)
	}
}

// socketConn speaks to a swtpm data channel (or any TPM command socket:
// raw TPM 2.0 commands and responses on a stream).
//
// swtpm serves a single data connection at a time and queues any other, so
// the connection is held only for the duration of one operation (a command
// sequence under the TPM's mutex) and closed at its end: an idle agent does
// not lock out other clients such as tpm2-tools or the harness's reboot.
type socketConn struct {
	network, addr string
	dial          dialFunc
	ctx           context.Context
	c             net.Conn
}

func newSocketConn(network, addr string, dial dialFunc) *socketConn {
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	return &socketConn{network: network, addr: addr, dial: dial, ctx: context.Background()}
}

func (s *socketConn) begin(ctx context.Context) { s.ctx = ctx }

func (s *socketConn) end() {
	s.ctx = context.Background()
	s.drop()
}

func (s *socketConn) drop() {
	if s.c != nil {
		_ = s.c.Close()
		s.c = nil
	}
}

// Close implements io.Closer.
func (s *socketConn) Close() error {
	s.drop()
	return nil
}

func (s *socketConn) connect() error {
	if s.c != nil {
		return nil
	}
	// swtpm accepts one data connection at a time with a short backlog: a
	// unix connect then fails with EAGAIN while another client is served,
	// so wait for it to finish.
	ctx := s.ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultCommandTimeout)
		defer cancel()
	}
	delay := time.Millisecond
	for {
		c, err := s.dial(ctx, s.network, s.addr)
		if err == nil {
			s.c = c
			return nil
		}
		if !errors.Is(err, syscall.EAGAIN) {
			return fmt.Errorf("connecting to TPM at %s://%s: %w", s.network, s.addr, err)
		}
		wait := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			wait.Stop()
			return fmt.Errorf("connecting to TPM at %s://%s: %w", s.network, s.addr, ctx.Err())
		case <-wait.C:
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// isRetryCode reports the warnings with which a TPM declines to start a
// command that will succeed if simply sent again (TPM 2.0 Part 2, 6.6.3).
// libtpms answers TPM_RC_RETRY now and then to ECC operations.
func isRetryCode(rc uint32) bool {
	switch rc {
	case 0x908, // TPM_RC_YIELDED
		0x90a, // TPM_RC_TESTING
		0x922: // TPM_RC_RETRY
		return true
	}
	return false
}

const retryAttempts = 8

// sendRetrying sends cmd on c and re-sends it while the TPM answers with a
// retry warning.
func sendRetrying(ctx context.Context, send func([]byte) ([]byte, error), cmd []byte) ([]byte, error) {
	delay := time.Millisecond
	for attempt := 1; ; attempt++ {
		rsp, err := send(cmd)
		if err != nil || len(rsp) < responseHeaderSize || attempt == retryAttempts ||
			!isRetryCode(binary.BigEndian.Uint32(rsp[6:10])) {
			return rsp, err
		}
		wait := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			wait.Stop()
			return nil, ctx.Err()
		case <-wait.C:
		}
		delay *= 2
	}
}

// Send implements transport.TPM: it writes the command, reads the 10-byte
// header and then exactly the rest of the response, whatever the size of
// each Read. A connection found broken before any response byte arrived is
// re-established once and the command re-sent: the TPM did not answer it.
func (s *socketConn) Send(cmd []byte) ([]byte, error) {
	return sendRetrying(s.ctx, s.send, cmd)
}

func (s *socketConn) send(cmd []byte) ([]byte, error) {
	if err := s.ctx.Err(); err != nil {
		return nil, err
	}
	rsp, started, err := s.roundTrip(cmd)
	if err != nil && !started && s.ctx.Err() == nil {
		s.drop()
		rsp, _, err = s.roundTrip(cmd)
	}
	if err != nil {
		s.drop()
		return nil, err
	}
	return rsp, nil
}

// roundTrip reports whether any response byte was read, which makes a
// retry unsafe.
func (s *socketConn) roundTrip(cmd []byte) ([]byte, bool, error) {
	if err := s.connect(); err != nil {
		return nil, false, err
	}
	deadline, ok := s.ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(defaultCommandTimeout)
	}
	_ = s.c.SetDeadline(deadline)
	if _, err := s.c.Write(cmd); err != nil {
		return nil, false, fmt.Errorf("writing TPM command: %w", err)
	}
	hdr := make([]byte, responseHeaderSize)
	n, err := io.ReadFull(s.c, hdr)
	if err != nil {
		return nil, n > 0, fmt.Errorf("reading TPM response header: %w", err)
	}
	size, err := responseSize(hdr)
	if err != nil {
		return nil, true, err
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(s.c, rsp[responseHeaderSize:]); err != nil {
		return nil, true, fmt.Errorf("reading TPM response body: %w", err)
	}
	return rsp, true, nil
}

// responseSize validates a response header and returns the total size.
func responseSize(hdr []byte) (int, error) {
	if len(hdr) < responseHeaderSize {
		return 0, fmt.Errorf("TPM response header too short: %d bytes", len(hdr))
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < responseHeaderSize || size > maxResponseSize {
		return 0, fmt.Errorf("TPM response size %d out of range", size)
	}
	return int(size), nil
}

// deviceConn is a character device (/dev/tpmrm0, /dev/tpm0): the kernel
// returns a whole response per read, so go-tpm's transport is used as is.
type deviceConn struct {
	tpm transport.TPMCloser
	ctx context.Context
}

func openDevice(path string) (*deviceConn, error) {
	t, err := linuxtpm.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening TPM device %s: %w", path, err)
	}
	return &deviceConn{tpm: t, ctx: context.Background()}, nil
}

func (d *deviceConn) begin(ctx context.Context) { d.ctx = ctx }
func (d *deviceConn) end()                      { d.ctx = context.Background() }

// Send implements transport.TPM.
func (d *deviceConn) Send(cmd []byte) ([]byte, error) {
	return sendRetrying(d.ctx, d.send, cmd)
}

func (d *deviceConn) send(cmd []byte) ([]byte, error) {
	if err := d.ctx.Err(); err != nil {
		return nil, err
	}
	return d.tpm.Send(cmd)
}

// Close implements io.Closer.
func (d *deviceConn) Close() error { return d.tpm.Close() }
