package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/store"
)

// ServerIDPath is the path of the server's SPIFFE ID; node aliases
// (-node) are parented to it.
const ServerIDPath = "/ironroot/server"

func entryCmd(ctx context.Context, c *CLI, args []string) error {
	if len(args) == 0 {
		return usagef("want a subcommand: create, update, delete or show")
	}
	switch args[0] {
	case "create":
		return entryCreate(ctx, c, args[1:])
	case "update":
		return entryUpdate(ctx, c, args[1:])
	case "delete":
		return entryDelete(ctx, c, args[1:])
	case "show":
		return entryShow(ctx, c, args[1:])
	}
	return usagef("unknown subcommand %q: want create, update, delete or show", args[0])
}

// entryFlags are the fields of an entry as flags.
type entryFlags struct {
	entryID     string
	spiffeID    string
	parentID    string
	selectors   stringList
	dns         stringList
	node        bool
	x509SVIDTTL int
	jwtSVIDTTL  int
	hint        string
	data        string
}

func (e *entryFlags) register(fs *flag.FlagSet, withID bool) {
	if withID {
		fs.StringVar(&e.entryID, "entryID", "", "the ID of the entry to update")
	}
	fs.StringVar(&e.spiffeID, "spiffeID", "", "the SPIFFE ID of the workload or node alias")
	fs.StringVar(&e.parentID, "parentID", "", "the SPIFFE ID of the parent (an agent ID, or another entry's ID)")
	fs.Var(&e.selectors, "selector", "a selector type:value; repeat for several (e.g. unix:uid:1000)")
	fs.Var(&e.dns, "dns", "a DNS name for the X509-SVID; repeat for several")
	fs.BoolVar(&e.node, "node", false, "make a node alias: the parent is the server ID and the selectors match nodes")
	fs.IntVar(&e.x509SVIDTTL, "x509SVIDTTL", 0, "X509-SVID lifetime in seconds (0: the server default)")
	fs.IntVar(&e.jwtSVIDTTL, "jwtSVIDTTL", 0, "JWT-SVID lifetime in seconds (0: the server default)")
	fs.StringVar(&e.hint, "hint", "", "a hint passed to workloads with the SVID")
	fs.StringVar(&e.data, "data", "", "a JSON file of entries ({\"entries\":[...]}, - for stdin) instead of the flags")
}

// entry builds the entry the flags describe.
func (e *entryFlags) entry() (*agentv1.Entry, error) {
	if e.spiffeID == "" {
		return nil, usagef("-spiffeID is required")
	}
	if e.node {
		if e.parentID != "" {
			return nil, usagef("-node and -parentID are exclusive: a node alias is parented to the server")
		}
		td, err := trustDomainOf(e.spiffeID)
		if err != nil {
			return nil, usagef("-spiffeID: %v", err)
		}
		e.parentID = "spiffe://" + td + ServerIDPath
	}
	if e.parentID == "" {
		return nil, usagef("-parentID (or -node) is required")
	}
	if len(e.selectors) == 0 {
		return nil, usagef("at least one -selector is required")
	}
	if e.x509SVIDTTL < 0 || e.jwtSVIDTTL < 0 {
		return nil, usagef("TTLs must not be negative")
	}
	out := &agentv1.Entry{
		Id:          e.entryID,
		SpiffeId:    e.spiffeID,
		ParentId:    e.parentID,
		X509SvidTtl: int32(e.x509SVIDTTL),
		JwtSvidTtl:  int32(e.jwtSVIDTTL),
		DnsNames:    e.dns,
		Hint:        e.hint,
	}
	for _, s := range e.selectors {
		sel, err := store.ParseSelector(s)
		if err != nil {
			return nil, usagef("-selector: %v", err)
		}
		out.Selectors = append(out.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	return out, nil
}

func trustDomainOf(id string) (string, error) {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return "", fmt.Errorf("%q is not a spiffe:// ID", id)
	}
	td, _, _ := strings.Cut(rest, "/")
	if td == "" {
		return "", fmt.Errorf("%q has no trust domain", id)
	}
	return td, nil
}

// readEntries reads a -data file: {"entries": [Entry, ...]} in the proto
// JSON form (snake_case or camelCase field names).
func readEntries(path string, stdin io.Reader) ([]*agentv1.Entry, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(io.LimitReader(stdin, 64<<20))
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading -data: %w", err)
	}
	var req adminv1.BatchCreateEntryRequest
	if err := protojson.Unmarshal(data, &req); err != nil {
		return nil, fmt.Errorf("parsing -data %s: %w", path, err)
	}
	if len(req.Entries) == 0 {
		return nil, fmt.Errorf("-data %s holds no entries", path)
	}
	return req.Entries, nil
}

func entryCreate(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "entry create")
	var e entryFlags
	var a adminFlags
	e.register(fs, false)
	a.register(fs, true)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := a.check(); err != nil {
		return err
	}
	var entries []*agentv1.Entry
	if e.data != "" {
		if e.spiffeID != "" || e.parentID != "" || len(e.selectors) > 0 {
			return usagef("-data and entry flags are exclusive")
		}
		var err error
		if entries, err = readEntries(e.data, os.Stdin); err != nil {
			return err
		}
	} else {
		en, err := e.entry()
		if err != nil {
			return err
		}
		entries = []*agentv1.Entry{en}
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := client.BatchCreateEntry(ctx, &adminv1.BatchCreateEntryRequest{Entries: entries})
	if err != nil {
		return err
	}
	return printEntries(c.Stdout, a.output, resp.Entries)
}

func entryUpdate(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "entry update")
	var e entryFlags
	var a adminFlags
	e.register(fs, true)
	a.register(fs, true)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := a.check(); err != nil {
		return err
	}
	if e.data != "" {
		return usagef("-data is only for create")
	}
	if e.entryID == "" {
		return usagef("-entryID is required")
	}
	en, err := e.entry()
	if err != nil {
		return err
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	out, err := client.UpdateEntry(ctx, &adminv1.UpdateEntryRequest{Entry: en})
	if err != nil {
		return err
	}
	return printEntries(c.Stdout, a.output, []*agentv1.Entry{out})
}

func entryDelete(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "entry delete")
	var a adminFlags
	id := fs.String("entryID", "", "the ID of the entry to delete")
	a.register(fs, false)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *id == "" {
		return usagef("-entryID is required")
	}
	conn, client, err := a.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := client.DeleteEntry(ctx, &adminv1.DeleteEntryRequest{Id: *id}); err != nil {
		return err
	}
	fmt.Fprintf(c.Stdout, "Deleted entry with ID: %s\n", *id)
	return nil
}

func entryShow(ctx context.Context, c *CLI, args []string) error {
	fs := newFlagSet(c, "entry show")
	var a adminFlags
	var sels stringList
	id := fs.String("entryID", "", "show this entry only")
	spiffeID := fs.String("spiffeID", "", "show entries with this SPIFFE ID")
	parentID := fs.String("parentID", "", "show entries with this parent ID")
	fs.Var(&sels, "selector", "show entries with exactly these selectors; repeat for several")
	a.register(fs, true)
	if err := parse(fs, args); err != nil {
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
	if *id != "" {
		en, err := client.GetEntry(ctx, &adminv1.GetEntryRequest{Id: *id})
		if err != nil {
			return err
		}
		return printEntries(c.Stdout, a.output, []*agentv1.Entry{en})
	}
	req := &adminv1.ListEntriesRequest{SpiffeId: *spiffeID, ParentId: *parentID}
	for _, s := range sels {
		sel, err := store.ParseSelector(s)
		if err != nil {
			return usagef("-selector: %v", err)
		}
		req.Selectors = append(req.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	resp, err := client.ListEntries(ctx, req)
	if err != nil {
		return err
	}
	return printEntries(c.Stdout, a.output, resp.Entries)
}

// printEntries prints entries as SPIRE does, or as JSON for scripts.
func printEntries(w io.Writer, format string, entries []*agentv1.Entry) error {
	if format == "json" {
		return writeJSON(w, map[string]any{"entries": protoList(entries)})
	}
	fmt.Fprintf(w, "Found %d entr%s\n", len(entries), map[bool]string{true: "y", false: "ies"}[len(entries) == 1])
	for _, e := range entries {
		fmt.Fprintf(w, "Entry ID         : %s\n", e.Id)
		fmt.Fprintf(w, "SPIFFE ID        : %s\n", e.SpiffeId)
		fmt.Fprintf(w, "Parent ID        : %s\n", e.ParentId)
		fmt.Fprintf(w, "Revision         : %d\n", e.RevisionNumber)
		fmt.Fprintf(w, "X509-SVID TTL    : %s\n", ttlString(e.X509SvidTtl))
		fmt.Fprintf(w, "JWT-SVID TTL     : %s\n", ttlString(e.JwtSvidTtl))
		for _, s := range e.Selectors {
			fmt.Fprintf(w, "Selector         : %s:%s\n", s.Type, s.Value)
		}
		for _, d := range e.DnsNames {
			fmt.Fprintf(w, "DNS name         : %s\n", d)
		}
		if e.Hint != "" {
			fmt.Fprintf(w, "Hint             : %s\n", e.Hint)
		}
		fmt.Fprintln(w)
	}
	return nil
}

func ttlString(s int32) string {
	if s == 0 {
		return "default"
	}
	return (time.Duration(s) * time.Second).String()
}

// protoList renders proto messages as JSON values with snake_case names.
func protoList[M proto.Message](ms []M) []json.RawMessage {
	out := make([]json.RawMessage, 0, len(ms))
	for _, m := range ms {
		out = append(out, protoJSON(m))
	}
	return out
}

func protoJSON(m proto.Message) json.RawMessage {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		// Marshaling a well-formed generated message cannot fail; keep the
		// output valid JSON regardless.
		return json.RawMessage(`null`)
	}
	return b
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return errors.New("writing JSON output: " + err.Error())
	}
	return nil
}
