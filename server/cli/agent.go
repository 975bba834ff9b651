package cli

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
)

func agentCmd(ctx context.Context, c *CLI, args []string) error {
	if len(args) == 0 {
		return usagef("want a subcommand: list, show, evict or ban")
	}
	sub, args := args[0], args[1:]
	fs := newFlagSet(c, "agent "+sub)
	var a adminFlags
	a.register(fs, true)
	var id *string
	switch sub {
	case "list":
	case "show", "evict", "ban":
		id = fs.String("spiffeID", "", "the agent's SPIFFE ID")
	default:
		return usagef("unknown subcommand %q: want list, show, evict or ban", sub)
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := a.check(); err != nil {
		return err
	}
	if id != nil {
		if *id == "" {
			return usagef("-spiffeID is required")
		}
		if _, err := spiffeid.FromString(*id); err != nil {
			return usagef("-spiffeID: %v", err)
		}
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	switch sub {
	case "list":
		resp, err := client.ListAgents(ctx, &adminv1.ListAgentsRequest{})
		if err != nil {
			return err
		}
		return printAgents(c.Stdout, a.output, resp.Agents, false)
	case "show":
		ag, err := client.GetAgent(ctx, &adminv1.GetAgentRequest{SpiffeId: *id})
		if err != nil {
			return err
		}
		return printAgents(c.Stdout, a.output, []*adminv1.AgentInfo{ag}, true)
	case "evict":
		if _, err := client.EvictAgent(ctx, &adminv1.AgentRequest{SpiffeId: *id}); err != nil {
			return err
		}
		return printDone(c.Stdout, a.output, "Agent evicted successfully", *id)
	default: // ban
		if _, err := client.BanAgent(ctx, &adminv1.AgentRequest{SpiffeId: *id}); err != nil {
			return err
		}
		return printDone(c.Stdout, a.output, "Agent banned successfully", *id)
	}
}

func printDone(w io.Writer, format, msg, id string) error {
	if format == "json" {
		return writeJSON(w, map[string]string{"spiffe_id": id, "result": msg})
	}
	fmt.Fprintln(w, msg)
	return nil
}

func printAgents(w io.Writer, format string, agents []*adminv1.AgentInfo, detail bool) error {
	if format == "json" {
		type out struct {
			Agent    json.RawMessage `json:"agent"`
			Evidence json.RawMessage `json:"evidence,omitempty"`
		}
		list := make([]out, 0, len(agents))
		for _, ag := range agents {
			o := out{Agent: protoJSON(ag)}
			if json.Valid(ag.Evidence) {
				o.Evidence = ag.Evidence
			}
			list = append(list, o)
		}
		return writeJSON(w, map[string]any{"agents": list})
	}
	fmt.Fprintf(w, "Found %d attested agent%s:\n\n", len(agents), map[bool]string{true: "", false: "s"}[len(agents) == 1])
	for _, ag := range agents {
		fmt.Fprintf(w, "SPIFFE ID         : %s\n", ag.SpiffeId)
		fmt.Fprintf(w, "EK hash           : %s\n", ag.EkHash)
		fmt.Fprintf(w, "Attestation type  : tpm\n")
		if ag.CertNotAfter > 0 {
			fmt.Fprintf(w, "Expiration time   : %s\n", time.Unix(ag.CertNotAfter, 0).UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(w, "Serial number     : %s\n", ag.CertSerial)
		fmt.Fprintf(w, "Banned            : %t\n", ag.Banned)
		if detail {
			for _, s := range ag.Selectors {
				fmt.Fprintf(w, "Selector          : %s:%s\n", s.Type, s.Value)
			}
			if len(ag.Evidence) > 0 {
				var pretty bytes.Buffer
				if json.Indent(&pretty, ag.Evidence, "                    ", "  ") == nil {
					fmt.Fprintf(w, "Evidence          : %s\n", pretty.String())
				}
			}
		}
		fmt.Fprintln(w)
	}
	return nil
}

func bundleCmd(ctx context.Context, c *CLI, args []string) error {
	if len(args) == 0 || args[0] != "show" {
		return usagef("want the subcommand: show")
	}
	fs := newFlagSet(c, "bundle show")
	var a adminFlags
	a.register(fs, false)
	format := fs.String("format", "pem", "pem (CA certificates) or spiffe (the SPIFFE bundle JWKS)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if *format != "pem" && *format != "spiffe" {
		return usagef("-format: %q is not pem or spiffe", *format)
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	b, err := client.GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		return err
	}
	if *format == "pem" {
		for _, der := range b.X509Authorities {
			if err := pem.Encode(c.Stdout, &pem.Block{Type: "CERTIFICATE", Bytes: der}); err != nil {
				return fmt.Errorf("writing bundle: %w", err)
			}
		}
		return nil
	}
	sb, err := ToSPIFFEBundle(b)
	if err != nil {
		return err
	}
	doc, err := sb.Marshal()
	if err != nil {
		return fmt.Errorf("encoding SPIFFE bundle: %w", err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, doc, "", "    "); err != nil {
		return fmt.Errorf("encoding SPIFFE bundle: %w", err)
	}
	pretty.WriteByte('\n')
	_, err = c.Stdout.Write(pretty.Bytes())
	return err
}

// ToSPIFFEBundle converts the API's bundle into go-spiffe's SPIFFE bundle.
func ToSPIFFEBundle(b *agentv1.Bundle) (*spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(b.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("bundle trust domain: %w", err)
	}
	sb := spiffebundle.New(td)
	for _, der := range b.X509Authorities {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parsing bundle certificate: %w", err)
		}
		sb.AddX509Authority(cert)
	}
	for _, j := range b.JwtAuthorities {
		pub, err := x509.ParsePKIXPublicKey(j.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("parsing JWT authority %s: %w", j.KeyId, err)
		}
		if err := sb.AddJWTAuthority(j.KeyId, pub); err != nil {
			return nil, fmt.Errorf("adding JWT authority %s: %w", j.KeyId, err)
		}
	}
	sb.SetSequenceNumber(uint64(b.SequenceNumber))
	if b.RefreshHintSeconds > 0 {
		sb.SetRefreshHint(time.Duration(b.RefreshHintSeconds) * time.Second)
	}
	return sb, nil
}

func caCmd(ctx context.Context, c *CLI, args []string) error {
	if len(args) == 0 || args[0] != "show" {
		return usagef("want the subcommand: show")
	}
	fs := newFlagSet(c, "ca show")
	var a adminFlags
	a.register(fs, true)
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if err := a.check(); err != nil {
		return err
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := client.ListAuthorities(ctx, &adminv1.ListAuthoritiesRequest{})
	if err != nil {
		return err
	}
	if a.output == "json" {
		return writeJSON(c.Stdout, map[string]any{"authorities": protoList(resp.Authorities)})
	}
	for _, au := range resp.Authorities {
		fmt.Fprintf(c.Stdout, "%-5s %-9s %s\n", au.Kind, au.State, au.Id)
		fmt.Fprintf(c.Stdout, "      Key        : %s\n", au.KeyUri)
		if au.KeyId != "" {
			fmt.Fprintf(c.Stdout, "      Key ID     : %s\n", au.KeyId)
		}
		fmt.Fprintf(c.Stdout, "      Not before : %s\n", time.Unix(au.NotBefore, 0).UTC().Format(time.RFC3339))
		fmt.Fprintf(c.Stdout, "      Not after  : %s\n\n", time.Unix(au.NotAfter, 0).UTC().Format(time.RFC3339))
	}
	return nil
}
