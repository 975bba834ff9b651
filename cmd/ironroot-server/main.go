// Command ironroot-server is the trust domain's CA: it attests agents by
// their TPMs, keeps registration entries and signs SVIDs with keys held in
// an HSM. See docs/server-config.md and `ironroot-server help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/ironroot/ironroot/server"
	"github.com/ironroot/ironroot/server/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	c := &cli.CLI{Stdout: os.Stdout, Stderr: os.Stderr, Run: server.RunFromFlags}
	code := c.Main(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
