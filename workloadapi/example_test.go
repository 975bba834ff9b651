package workloadapi_test

import (
	"context"
	"log/slog"
	"os"
	"os/signal"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/workloadapi"
)

// An agent wires its SVID cache (any workloadapi.Source) and the unix
// attestor into a server on its socket and serves until interrupted.
func Example() {
	var cache workloadapi.Source               // the agent's SVID cache
	usesPath := func() bool { return false }   // does any entry use unix:path?
	usesSHA256 := func() bool { return false } // does any entry use unix:sha256?

	srv, err := workloadapi.New(
		unix.New(unix.WithPathSelectors(usesPath), unix.WithSHA256Selectors(usesSHA256)),
		cache,
		workloadapi.WithLogger(slog.Default()),
	)
	if err != nil {
		slog.Error("creating workload API", "error", err)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := srv.ListenAndServe(ctx, "/run/ironroot/agent.sock"); err != nil {
		slog.Error("workload API", "error", err)
	}
}
