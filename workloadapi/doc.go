// Package workloadapi serves the SPIFFE Workload API on a unix socket.
//
// The server implements the go-spiffe generated service
// (github.com/spiffe/go-spiffe/v2/proto/spiffe/workload), so any go-spiffe
// client works unchanged. It depends on the agent only through two
// interfaces: an Attestor turns the caller's PID into selectors, and a Source
// (the agent's SVID cache) says which SVIDs and bundles those selectors are
// entitled to and pushes every change.
//
// Callers are identified by the kernel, never by anything they send: the
// server's transport credentials (PeerCredentials) read SO_PEERCRED on every
// accepted connection and hold a pidfd on the caller so that a PID reused
// between the credential read and the /proc reads fails attestation.
package workloadapi
