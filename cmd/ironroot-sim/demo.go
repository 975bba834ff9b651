package main

import (
	"context"

	"github.com/ironroot/ironroot/simulator/demo"
)

func init() {
	register("demo", command{
		summary: "hardware smoke demo: attest a software TPM, sign with a SoftHSM key, print each check (see docs/demo.md)",
		run:     runDemo,
	})
}

func runDemo(ctx context.Context, out *output, args []string) error {
	fs := newFlags("demo", out)
	dir := fs.String("dir", ".demo", "directory for all demo state (a previous demo's is cleared first)")
	td := fs.String("trustDomain", "example.org", "trust domain of the agent ID")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	return demo.Run(ctx, out.stdout, *dir, demo.WithTrustDomain(*td))
}
