// Command ironroot-sim stands up the software hardware roots Ironroot's
// tests and demo use, for people and scripts: software TPMs (swtpm with EK
// certificates from a private CA) and SoftHSM2 tokens.
//
//	ironroot-sim demo [-dir .demo] [-trustDomain example.org]
//	ironroot-sim tpm manufacture -dir D [-ca CADIR]
//	ironroot-sim tpm serve -dir D [-socket PATH | -tcp 127.0.0.1:PORT]
//	ironroot-sim help
//
// See docs/tpm.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

// command is one subcommand, addressed as "<group> <verb>".
type command struct {
	// summary is the one-line description for help.
	summary string
	// run executes the command with its own arguments.
	run func(ctx context.Context, out *output, args []string) error
}

// output is where commands write: results to stdout, diagnostics to stderr.
type output struct {
	stdout, stderr io.Writer
}

// registry holds the subcommands. Each file of this package adds its own in
// init() with register, so groups (tpm, hsm, demo) stay independent.
var registry = map[string]command{}

// register adds a subcommand named "<group> <verb>" or a single word.
func register(name string, c command) {
	if _, dup := registry[name]; dup {
		panic("ironroot-sim: duplicate command " + name) // programming error, at init
	}
	registry[name] = c
}

// errUsage marks a command-line mistake (exit code 2).
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], &output{stdout: os.Stdout, stderr: os.Stderr})
	stop()
	os.Exit(code)
}

// run dispatches args to a subcommand and returns the exit code.
func run(ctx context.Context, args []string, out *output) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" {
		usage(out.stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	// A command is one word ("demo") or "<group> <verb>".
	name, rest := args[0], args[1:]
	c, ok := registry[name]
	if !ok {
		if len(args) < 2 {
			fmt.Fprintf(out.stderr, "ironroot-sim: %q needs a subcommand\n", args[0])
			usage(out.stderr)
			return 2
		}
		name, rest = args[0]+" "+args[1], args[2:]
		if c, ok = registry[name]; !ok {
			fmt.Fprintf(out.stderr, "ironroot-sim: unknown command %q\n", name)
			usage(out.stderr)
			return 2
		}
	}
	if err := c.run(ctx, out, rest); err != nil {
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
			return 2
		}
		fmt.Fprintf(out.stderr, "ironroot-sim %s: %v\n", name, err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w, "usage: ironroot-sim <command> [flags]   (ironroot-sim <command> -h for flags)")
	fmt.Fprintln(w, "\ncommands:")
	for _, n := range names {
		fmt.Fprintf(w, "  %-18s %s\n", n, registry[n].summary)
	}
}

// newFlags returns a flag set that reports errors instead of exiting.
func newFlags(name string, out *output) *flag.FlagSet {
	fs := flag.NewFlagSet("ironroot-sim "+name, flag.ContinueOnError)
	fs.SetOutput(out.stderr)
	return fs
}

// parseFlags parses args and refuses positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		fs.Usage()
		return errUsage
	}
	return nil
}
