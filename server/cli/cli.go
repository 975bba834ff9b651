// Package cli implements ironroot-server's command line: `run` and the
// administration commands (entry, agent, bundle, ca, healthcheck), which talk
// to a running server over its admin unix socket. Commands and flags follow
// SPIRE's (camelCase, single dash) so its operators feel at home.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	"github.com/ironroot/ironroot/server/config"
)

// RunFunc starts the server with the given flags and blocks until ctx ends.
type RunFunc func(ctx context.Context, flags config.Flags) error

// CLI is ironroot-server's command line.
type CLI struct {
	// Stdout and Stderr receive output and errors.
	Stdout, Stderr io.Writer
	// Run starts the server (the `run` command).
	Run RunFunc
}

type command struct {
	synopsis string
	run      func(ctx context.Context, c *CLI, args []string) error
}

func (c *CLI) commands() map[string]command {
	return map[string]command{
		"run":         {"run the server", runCmd},
		"entry":       {"create, update, delete or show registration entries", entryCmd},
		"agent":       {"list, show, evict or ban attested agents", agentCmd},
		"bundle":      {"show the trust bundle", bundleCmd},
		"ca":          {"show the CA's key slots", caCmd},
		"healthcheck": {"check that the server is serving", healthCmd},
	}
}

// Main runs the command in args (without the program name) and returns the
// process exit code.
func (c *CLI) Main(ctx context.Context, args []string) int {
	cmds := c.commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "help" || args[0] == "--help" {
		c.usage(cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(c.Stderr, "ironroot-server: unknown command %q\n", args[0])
		c.usage(cmds)
		return 2
	}
	if err := cmd.run(ctx, c, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(c.Stderr, "ironroot-server %s: %v\n", args[0], err)
			return 2
		}
		fmt.Fprintf(c.Stderr, "ironroot-server %s: %v\n", args[0], describe(err))
		return 1
	}
	return 0
}

func (c *CLI) usage(cmds map[string]command) {
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(c.Stderr, "Usage: ironroot-server <command> [flags]")
	for _, n := range names {
		fmt.Fprintf(c.Stderr, "  %-12s %s\n", n, cmds[n].synopsis)
	}
}

// usageError marks a mistake in the command line (exit status 2).
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// describe turns a gRPC status into "Code: message" for people.
func describe(err error) string {
	if s, ok := status.FromError(err); ok && s.Code() != 0 {
		return fmt.Sprintf("%s: %s", s.Code(), s.Message())
	}
	return err.Error()
}

func newFlagSet(c *CLI, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.Stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func runCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "run")
	var flags config.Flags
	flags.RegisterFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if c.Run == nil {
		return errors.New("run is not available in this build")
	}
	return c.Run(ctx, flags)
}

// adminFlags are the flags every admin command takes.
type adminFlags struct {
	socketPath string
	output     string
}

func (a *adminFlags) register(fs *flag.FlagSet, withOutput bool) {
	fs.StringVar(&a.socketPath, "socketPath", config.DefaultSocketPath, "path to the server's admin API socket")
	if withOutput {
		fs.StringVar(&a.output, "output", "pretty", "output format: pretty or json")
	}
}

func (a *adminFlags) check() error {
	switch a.output {
	case "", "pretty", "json":
		return nil
	}
	return usagef("-output: %q is not pretty or json", a.output)
}

// dial connects to the admin API. The socket is local; no TLS.
func (a *adminFlags) dial() (*grpc.ClientConn, adminv1.AdminClient, error) {
	if a.socketPath == "" {
		return nil, nil, usagef("-socketPath is required")
	}
	conn, err := grpc.NewClient("unix://"+a.socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to %s: %w", a.socketPath, err)
	}
	return conn, adminv1.NewAdminClient(conn), nil
}

func healthCmd(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "healthcheck")
	var a adminFlags
	a.register(fs, false)
	shallow := fs.Bool("shallow", false, "only check that the server answers (ignored: the check is always the gRPC health service)")
	verbose := fs.Bool("verbose", false, "print progress")
	if err := parse(fs, args); err != nil {
		return err
	}
	_ = shallow
	conn, _, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if *verbose {
		fmt.Fprintf(c.Stdout, "Checking server health at %s...\n", a.socketPath)
	}
	resp, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("server is unhealthy: %s", describe(err))
	}
	if resp.Status != grpc_health_v1.HealthCheckResponse_SERVING {
		return fmt.Errorf("server is unhealthy: %s", resp.Status)
	}
	fmt.Fprintln(c.Stdout, "Server is healthy.")
	return nil
}

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
