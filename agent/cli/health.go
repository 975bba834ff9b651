package cli

import (
	"context"
	"fmt"

	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// healthCmd asks the Workload API socket's gRPC health service whether the
// agent is serving, as SPIRE's `healthcheck` does.
func healthCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "healthcheck")
	var sf socketFlags
	sf.register(fs)
	verbose := fs.Bool("verbose", false, "print progress")
	// Accepted so SPIRE health-check scripts run unchanged; the check is
	// always the agent's gRPC health service.
	fs.Bool("shallow", false, "accepted for SPIRE compatibility; has no effect")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := sf.check(); err != nil {
		return err
	}
	addr, err := sf.address(c)
	if err != nil {
		return err
	}
	target, err := gsw.TargetFromAddress(addr)
	if err != nil {
		return usagef("-socketPath: %v", err)
	}
	if *verbose {
		fmt.Fprintf(c.Stdout, "Checking agent health at %s...\n", addr)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", addr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("agent is unhealthy: %s", describe(err))
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("agent is unhealthy: %s", resp.Status)
	}
	fmt.Fprintln(c.Stdout, "Agent is healthy.")
	return nil
}
