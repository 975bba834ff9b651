// Command ironroot-agent proves its host to ironroot-server with the host's
// TPM and serves the SPIFFE Workload API to local workloads. See
// docs/agent.md and `ironroot-agent help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/ironroot/ironroot/agent"
	"github.com/ironroot/ironroot/agent/cli"
)

// memoryLimit is the agent's default soft heap limit: an agent sits on every
// host, so it trades some GC work for a small footprint (about 28 MB RSS
// with 1,000 cached SVIDs). GOMEMLIMIT overrides it.
const memoryLimit = 16 << 20

func main() {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memoryLimit)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	c := &cli.CLI{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Run: agent.RunFromArgs}
	code := c.Main(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
