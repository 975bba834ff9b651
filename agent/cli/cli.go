// Package cli implements ironroot-agent's command line: `run` (through the
// Run hook), the Workload API client commands under `api` (fetch x509,
// fetch jwt, validate jwt, watch) and `healthcheck`. Commands and flags
// follow SPIRE's agent (camelCase, single dash) so its operators feel at
// home; the API commands use the go-spiffe client, so they see exactly what
// any workload sees.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/config"
	"github.com/ironroot/ironroot/workloadapi"
)

// DefaultTimeout bounds each Workload API call of the api commands.
const DefaultTimeout = 5 * time.Second

// CLI is ironroot-agent's command line.
type CLI struct {
	// Stdout and Stderr receive output and errors; Stdin is read by
	// `api validate jwt -svid -`.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Run starts the agent with the `run` command's arguments and blocks
	// until ctx ends. Nil means `run` is not available.
	Run func(ctx context.Context, args []string) error
	// Getenv reads the environment (SPIFFE_ENDPOINT_SOCKET); nil means
	// os.Getenv.
	Getenv func(string) string
}

type command struct {
	synopsis string
	run      func(ctx context.Context, c *CLI, args []string) error
}

func (c *CLI) commands() map[string]command {
	return map[string]command{
		"run":         {"run the agent", runCmd},
		"api":         {"fetch, validate or watch identities through the Workload API", apiCmd},
		"healthcheck": {"check that the agent's Workload API is serving", healthCmd},
	}
}

// Main runs the command in args (without the program name) and returns the
// process exit code: 0 on success, 1 on failure, 2 on a usage error.
func (c *CLI) Main(ctx context.Context, args []string) int {
	if c.Stdout == nil {
		c.Stdout = io.Discard
	}
	if c.Stderr == nil {
		c.Stderr = io.Discard
	}
	cmds := c.commands()
	if len(args) == 0 || isHelp(args[0]) {
		usage(c.Stderr, "ironroot-agent", cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(c.Stderr, "ironroot-agent: unknown command %q\n", args[0])
		usage(c.Stderr, "ironroot-agent", cmds)
		return 2
	}
	return c.exit("ironroot-agent "+args[0], cmd.run(ctx, c, args[1:]))
}

func (c *CLI) exit(name string, err error) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(c.Stderr, "%s: %v\n", name, err)
		return 2
	}
	fmt.Fprintf(c.Stderr, "%s: %v\n", name, describe(err))
	return 1
}

func isHelp(s string) bool { return s == "-h" || s == "-help" || s == "--help" || s == "help" }

func usage(w io.Writer, prefix string, cmds map[string]command) {
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(w, "Usage: %s <command> [flags]\n", prefix)
	for _, n := range names {
		fmt.Fprintf(w, "  %-14s %s\n", n, cmds[n].synopsis)
	}
}

// subcommand dispatches args[0] among cmds.
func subcommand(ctx context.Context, c *CLI, prefix string, cmds map[string]command, args []string) error {
	if len(args) == 0 {
		usage(c.Stderr, prefix, cmds)
		return usagef("a subcommand is required")
	}
	if isHelp(args[0]) {
		usage(c.Stderr, prefix, cmds)
		return flag.ErrHelp
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		usage(c.Stderr, prefix, cmds)
		return usagef("unknown subcommand %q", args[0])
	}
	return cmd.run(ctx, c, args[1:])
}

// usageError marks a mistake in the command line (exit status 2).
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// describe turns a gRPC status, also a wrapped one, into "Code: message"
// for people, keeping the context the command wrapped it in.
func describe(err error) string {
	var se interface {
		error
		GRPCStatus() *status.Status
	}
	if !errors.As(err, &se) {
		return err.Error()
	}
	s := se.GRPCStatus()
	if s.Code() == codes.OK {
		return err.Error()
	}
	prefix, _ := strings.CutSuffix(err.Error(), se.Error())
	return fmt.Sprintf("%s%s: %s", prefix, s.Code(), s.Message())
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
	if c.Run == nil {
		return errors.New("run is not available in this build")
	}
	return c.Run(ctx, args)
}

// socketFlags are the flags every Workload API command takes.
type socketFlags struct {
	socketPath string
	timeout    time.Duration
}

func (s *socketFlags) register(fs *flag.FlagSet) {
	s.registerSocket(fs)
	fs.DurationVar(&s.timeout, "timeout", DefaultTimeout, "time limit for the Workload API call")
}

// registerSocket adds -socketPath only (for commands that run until
// interrupted).
func (s *socketFlags) registerSocket(fs *flag.FlagSet) {
	fs.StringVar(&s.socketPath, "socketPath", "", "Workload API socket: a path or a unix:///path address (default $"+workloadapi.SocketEnv+", else "+config.DefaultSocketPath+")")
}

// address resolves -socketPath to a Workload API address.
func (s *socketFlags) address(c *CLI) (string, error) {
	v := s.socketPath
	if v == "" {
		getenv := c.Getenv
		if getenv == nil {
			getenv = os.Getenv
		}
		v = getenv(workloadapi.SocketEnv)
	}
	if v == "" {
		return workloadapi.SocketPathAddress(config.DefaultSocketPath), nil
	}
	if strings.Contains(v, "://") {
		if _, err := workloadapi.ParseAddress(v); err != nil {
			return "", usagef("-socketPath: %v", err)
		}
		return v, nil
	}
	abs, err := filepath.Abs(v)
	if err != nil {
		return "", usagef("-socketPath: %v", err)
	}
	return workloadapi.SocketPathAddress(abs), nil
}

func (s *socketFlags) check() error {
	if s.timeout <= 0 {
		return usagef("-timeout must be positive")
	}
	return nil
}

// stringList is a repeatable flag that also splits on commas.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error {
	for p := range strings.SplitSeq(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}
