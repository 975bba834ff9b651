package workloadapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// AuthType is the value PeerInfo.AuthType returns.
const AuthType = "ironroot-peercred"

// Caller is the process at the other end of a Workload API connection, as the
// kernel reported it through SO_PEERCRED when the connection was accepted.
//
// Caller also guards against PID reuse: at accept it holds a pidfd on the
// connecting process (SO_PEERPIDFD where the kernel has it, so the pidfd is
// the connecting process itself, else pidfd_open) and records the process
// start time. Verify, called after the /proc reads of workload attestation,
// fails if that process is gone or the PID now names another process.
type Caller struct {
	// PID, UID and GID are the peer's credentials at connect time.
	PID int32
	UID uint32
	GID uint32

	mu        sync.Mutex
	pidfd     int // -1 when none could be had
	startTime uint64
	err       error // why the caller cannot be attested, if it cannot
	closed    bool
}

// Verify reports whether the process that connected is still alive and still
// owns PID. It must be called after every attestation that read /proc/<PID>.
func (c *Caller) Verify() error {
	if c == nil {
		return errors.New("no peer credentials on the connection")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	if c.closed {
		return errors.New("connection closed")
	}
	if c.pidfd >= 0 {
		// Signal 0 probes without delivering anything. EPERM still proves the
		// process exists (an unprivileged agent probing another user).
		if err := unix.PidfdSendSignal(c.pidfd, 0, nil, 0); err != nil && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("checking caller process %d is alive: %w", c.PID, err)
		}
	}
	st, err := processStartTime(c.PID)
	if err != nil {
		return fmt.Errorf("re-reading caller process %d start time: %w", c.PID, err)
	}
	if st != c.startTime {
		return fmt.Errorf("caller process %d was replaced (start time %d, was %d)", c.PID, st, c.startTime)
	}
	return nil
}

// close releases the pidfd; later Verify calls fail.
func (c *Caller) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	if c.pidfd >= 0 {
		_ = unix.Close(c.pidfd)
		c.pidfd = -1
	}
}

// newCaller reads the peer credentials of a unix socket connection and
// starts tracking the peer process.
func newCaller(conn *net.UnixConn) (*Caller, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("getting raw socket: %w", err)
	}
	var (
		cred     *unix.Ucred
		credErr  error
		pidfd    = -1
		pidfdErr error
	)
	ctrlErr := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr != nil {
			return
		}
		// SO_PEERPIDFD (Linux 6.5+) names the process that connected, with
		// no window for the PID to be reused before we look.
		pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	})
	if ctrlErr != nil {
		return nil, fmt.Errorf("reading peer credentials: %w", ctrlErr)
	}
	if credErr != nil {
		return nil, fmt.Errorf("reading peer credentials: %w", credErr)
	}
	c := &Caller{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid, pidfd: -1}
	if cred.Pid <= 0 {
		// The peer lives in a PID namespace we cannot see.
		c.err = errors.New("peer process is not visible in this PID namespace")
		return c, nil
	}
	if pidfdErr != nil || pidfd < 0 {
		pidfd, pidfdErr = unix.PidfdOpen(int(cred.Pid), 0)
		if pidfdErr != nil {
			// Older kernels: fall back to the start-time check alone.
			pidfd = -1
		}
	}
	c.pidfd = pidfd
	st, err := processStartTime(cred.Pid)
	if err != nil {
		c.err = fmt.Errorf("reading caller process %d start time: %w", cred.Pid, err)
		return c, nil
	}
	c.startTime = st
	// The start time read must belong to the process the pidfd names.
	if pidfd >= 0 {
		if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil && !errors.Is(err, unix.EPERM) {
			c.err = fmt.Errorf("caller process %d exited during accept: %w", cred.Pid, err)
		}
	}
	return c, nil
}

// processStartTime returns field 22 (starttime, clock ticks since boot) of
// /proc/<pid>/stat.
func processStartTime(pid int32) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStartTime(b)
}

// parseStartTime extracts starttime from the text of /proc/<pid>/stat. The
// command name (field 2) may hold spaces and parentheses, so fields are
// counted from the last ')'.
func parseStartTime(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("malformed stat: no command name")
	}
	fields := bytes.Fields(stat[i+1:])
	// fields[0] is field 3 (state), so field 22 is fields[19].
	if len(fields) < 20 {
		return 0, errors.New("malformed stat: too few fields")
	}
	v, err := strconv.ParseUint(string(fields[19]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed stat start time: %w", err)
	}
	return v, nil
}

// PeerInfo is the credentials.AuthInfo of a connection accepted with
// PeerCredentials.
type PeerInfo struct {
	credentials.CommonAuthInfo
	// Caller is the connecting process.
	Caller *Caller
}

// AuthType implements credentials.AuthInfo.
func (PeerInfo) AuthType() string { return AuthType }

// CallerFromContext returns the Caller of the RPC whose context is ctx, if
// the connection was accepted with PeerCredentials.
func CallerFromContext(ctx context.Context) (*Caller, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	info, ok := p.AuthInfo.(PeerInfo)
	if !ok || info.Caller == nil {
		return nil, false
	}
	return info.Caller, true
}

// PeerCredentials returns gRPC server transport credentials that identify the
// peer of each unix socket connection by SO_PEERCRED and track it against PID
// reuse. They do no encryption: the Workload API must not require TLS, and
// callers are identified by the kernel. Connections that are not unix sockets
// are refused.
func PeerCredentials() credentials.TransportCredentials { return peerCreds{} }

type peerCreds struct{}

func (peerCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, PeerInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("workload API connection is %T, not a unix socket: callers cannot be identified", conn)
	}
	c, err := newCaller(uc)
	if err != nil {
		return nil, nil, err
	}
	info := PeerInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}, Caller: c}
	return &trackedConn{UnixConn: uc, caller: c}, info, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: AuthType}
}

func (p peerCreds) Clone() credentials.TransportCredentials { return p }

func (peerCreds) OverrideServerName(string) error { return nil }

// trackedConn releases the caller's pidfd when gRPC closes the connection.
type trackedConn struct {
	*net.UnixConn
	caller *Caller
}

func (t *trackedConn) Close() error {
	t.caller.close()
	return t.UnixConn.Close()
}
