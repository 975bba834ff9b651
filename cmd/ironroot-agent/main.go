// Command ironroot-agent proves its host to ironroot-server with the host's
// TPM and serves the SPIFFE Workload API to local workloads. See
// docs/agent.md and `ironroot-agent help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/ironroot/ironroot/agent"
	"github.com/ironroot/ironroot/agent/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	c := &cli.CLI{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Run: agent.RunFromArgs}
	code := c.Main(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
