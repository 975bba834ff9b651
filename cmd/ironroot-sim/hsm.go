package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ironroot/ironroot/simulator"
)

func init() {
	register("hsm init", command{
		summary: "initialise a SoftHSM2 token in a private configuration; print SOFTHSM2_CONF and its pkcs11: URI",
		run:     hsmInit,
	})
}

// hsmInitTimeout bounds softhsm2-util.
const hsmInitTimeout = time.Minute

// hsmInit creates (or reuses) the private SoftHSM configuration in -dir and
// initialises a token labelled -label in it. The output is two shell
// exports, so `eval "$(ironroot-sim hsm init ...)"` sets both for the
// commands started afterwards:
//
//	export SOFTHSM2_CONF='/d/softhsm2.conf'
//	export HSM_URI='pkcs11:token=ca?module-path=...&pin-source=file:///d/pins/....pin'
//
// The PIN goes to a 0600 file named by the URI, never to the output.
func hsmInit(ctx context.Context, out *output, args []string) error {
	fs := newFlags("hsm init", out)
	dir := fs.String("dir", "", "directory for softhsm2.conf, the tokens and the PIN files")
	label := fs.String("label", "", "token label (1 to 32 bytes)")
	pin := fs.String("pin", "", "user PIN (default: random; note that a PIN on the command line is visible to other local users)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return missingFlag(fs, "dir")
	}
	if *label == "" {
		return missingFlag(fs, "label")
	}
	ctx, cancel := context.WithTimeout(ctx, hsmInitTimeout)
	defer cancel()
	s, err := simulator.NewSoftHSM(*dir)
	if err != nil {
		return err
	}
	tok, err := s.InitToken(ctx, *label, *pin)
	if err != nil {
		return err
	}
	fmt.Fprintf(out.stdout, "export %s=%s\n", simulator.SoftHSMConfEnv, shellQuote(tok.ConfPath))
	fmt.Fprintf(out.stdout, "export HSM_URI=%s\n", shellQuote(tok.URI))
	return nil
}

// shellQuote single-quotes s for POSIX shells.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
