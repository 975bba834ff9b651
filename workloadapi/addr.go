package workloadapi

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"

	gospiffe "github.com/spiffe/go-spiffe/v2/workloadapi"
)

// SocketEnv is the environment variable that holds the default Workload API
// address, e.g. unix:///run/ironroot/agent.sock.
const SocketEnv = "SPIFFE_ENDPOINT_SOCKET"

// DefaultAddress returns the value of SPIFFE_ENDPOINT_SOCKET, if set.
func DefaultAddress() (string, bool) { return os.LookupEnv(SocketEnv) }

// ValidateAddress accepts and rejects exactly the addresses go-spiffe
// clients do: unix:///absolute/path, or tcp://IP:port with nothing else.
func ValidateAddress(addr string) error {
	_, err := gospiffe.TargetFromAddress(addr)
	return err
}

// ParseAddress parses a Workload API address (the SPIFFE_ENDPOINT_SOCKET
// syntax) into a dialable *net.UnixAddr or *net.TCPAddr. It applies
// go-spiffe's rules and, in addition, refuses a unix URI with an authority
// (unix://relative/path), which gRPC cannot dial either.
func ParseAddress(addr string) (net.Addr, error) {
	if err := ValidateAddress(addr); err != nil {
		return nil, fmt.Errorf("parsing workload API address: %w", err)
	}
	u, err := url.Parse(addr)
	if err != nil {
		return nil, fmt.Errorf("parsing workload API address: %w", err)
	}
	switch u.Scheme {
	case "unix":
		if u.Host != "" || u.Path == "" || u.Path[0] != '/' {
			return nil, errors.New("parsing workload API address: unix socket URI must be unix:///absolute/path")
		}
		return &net.UnixAddr{Name: u.Path, Net: "unix"}, nil
	case "tcp":
		a, err := net.ResolveTCPAddr("tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("parsing workload API address: %w", err)
		}
		return a, nil
	}
	return nil, fmt.Errorf("parsing workload API address: unsupported scheme %q", u.Scheme)
}

// SocketPathAddress returns the unix:// address of an absolute socket path,
// for SPIFFE_ENDPOINT_SOCKET.
func SocketPathAddress(path string) string {
	return (&url.URL{Scheme: "unix", Path: path}).String()
}
