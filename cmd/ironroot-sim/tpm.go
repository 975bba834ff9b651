package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/tpm"
)

func init() {
	register("tpm manufacture", command{
		summary: "manufacture a software TPM with EK certificates from a private CA",
		run:     tpmManufacture,
	})
	register("tpm serve", command{
		summary: "run swtpm on a manufactured TPM until interrupted",
		run:     tpmServe,
	})
}

// Layout of a -dir: the TPM state and, unless -ca says otherwise, its CA.
const (
	stateSubdir = "state"
	caSubdir    = "ca"
)

func tpmManufacture(ctx context.Context, out *output, args []string) error {
	fs := newFlags("tpm manufacture", out)
	dir := fs.String("dir", "", "directory for the TPM (state in DIR/state)")
	caDir := fs.String("ca", "", "CA directory, shared by TPMs of one manufacturer (default DIR/ca)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return missingFlag(fs, "dir")
	}
	if *caDir == "" {
		*caDir = filepath.Join(*dir, caSubdir)
	}
	ca, err := simulator.NewCA(ctx, *caDir)
	if err != nil {
		return err
	}
	state, err := ca.Manufacture(ctx, filepath.Join(*dir, stateSubdir))
	if err != nil {
		return err
	}
	fmt.Fprintf(out.stdout, "state:        %s\n", state.Dir)
	fmt.Fprintf(out.stdout, "root:         %s\n", ca.RootPath())
	fmt.Fprintf(out.stdout, "intermediate: %s\n", ca.IntermediatePath())
	// Read the EKs back through the agent's own code path.
	sw, err := simulator.Start(ctx, state)
	if err != nil {
		return err
	}
	defer sw.Stop()
	t, err := tpm.Open(ctx, sw.Address())
	if err != nil {
		return err
	}
	defer t.Close()
	eks, err := t.EndorsementKeys(ctx)
	if err != nil {
		return err
	}
	for _, ek := range eks {
		h, err := ek.Hash()
		if err != nil {
			return err
		}
		fmt.Fprintf(out.stdout, "ek %-9s  %s (handle 0x%08x, certificate %d bytes)\n", ek.Algorithm+":", h, ek.Handle, len(ek.Certificate))
	}
	return nil
}

func tpmServe(ctx context.Context, out *output, args []string) error {
	fs := newFlags("tpm serve", out)
	dir := fs.String("dir", "", "directory of a manufactured TPM (see tpm manufacture)")
	socket := fs.String("socket", "", "unix socket path of the data channel (default DIR/swtpm.sock; control channel PATH.ctrl)")
	tcp := fs.String("tcp", "", "serve on TCP host:port instead (control channel on port+1)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return missingFlag(fs, "dir")
	}
	if *socket != "" && *tcp != "" {
		fmt.Fprintln(out.stderr, "-socket and -tcp are exclusive")
		return errUsage
	}
	state, err := openStateDir(*dir)
	if err != nil {
		return err
	}
	var opts []simulator.StartOption
	switch {
	case *tcp != "":
		opts = append(opts, simulator.WithTCPAddr(*tcp))
	case *socket != "":
		opts = append(opts, simulator.WithSocketPath(*socket))
	default:
		opts = append(opts, simulator.WithSocketPath(filepath.Join(*dir, "swtpm.sock")))
	}
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	sw, err := simulator.Start(startCtx, state, opts...)
	cancel()
	if err != nil {
		return err
	}
	fmt.Fprintf(out.stdout, "address: %s\ncontrol: %s\npid:     %d\n", sw.Address(), sw.ControlAddress(), sw.PID())
	<-ctx.Done()
	return sw.Stop()
}

// openStateDir accepts either the -dir of tpm manufacture or the state
// directory itself.
func openStateDir(dir string) (*simulator.State, error) {
	sub := filepath.Join(dir, stateSubdir)
	if fi, err := os.Stat(sub); err == nil && fi.IsDir() {
		return simulator.OpenState(sub)
	}
	return simulator.OpenState(dir)
}

func missingFlag(fs *flag.FlagSet, name string) error {
	fmt.Fprintf(fs.Output(), "-%s is required\n", name)
	fs.Usage()
	return errors.Join(errUsage, fmt.Errorf("-%s is required", name))
}
