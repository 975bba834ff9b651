package store

import (
	"fmt"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits on selectors, generous for real use and small enough that a
// hostile request cannot bloat the database.
const (
	maxSelectorTypeLen  = 64
	maxSelectorValueLen = 1024
	maxSelectors        = 256
)

// Selector is one "type:value" attribute of a node or workload, such as
// tpm:ek_hash:<hex> or unix:uid:1000.
type Selector struct {
	// Type is the selector namespace ("tpm", "unix"); it has no colon.
	Type string
	// Value is everything after the first colon; it may contain colons
	// (tpm:pcr:sha256:0:ab.. has Value "pcr:sha256:0:ab..").
	Value string
}

// ParseSelector parses "type:value". Both parts must be non-empty.
func ParseSelector(s string) (Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok {
		return Selector{}, fmt.Errorf("parsing selector %q: %w: want type:value", s, ErrInvalid)
	}
	sel := Selector{Type: typ, Value: value}
	if err := sel.Validate(); err != nil {
		return Selector{}, fmt.Errorf("parsing selector %q: %w", s, err)
	}
	return sel, nil
}

// String returns "type:value".
func (s Selector) String() string { return s.Type + ":" + s.Value }

// Validate checks that both parts are present, printable and bounded.
func (s Selector) Validate() error {
	switch {
	case s.Type == "":
		return fmt.Errorf("%w: selector type is empty", ErrInvalid)
	case s.Value == "":
		return fmt.Errorf("%w: selector %q has an empty value", ErrInvalid, s.Type)
	case strings.Contains(s.Type, ":"):
		return fmt.Errorf("%w: selector type %q contains ':'", ErrInvalid, s.Type)
	case len(s.Type) > maxSelectorTypeLen:
		return fmt.Errorf("%w: selector type longer than %d bytes", ErrInvalid, maxSelectorTypeLen)
	case len(s.Value) > maxSelectorValueLen:
		return fmt.Errorf("%w: selector value longer than %d bytes", ErrInvalid, maxSelectorValueLen)
	case !printable(s.Type) || !printable(s.Value):
		return fmt.Errorf("%w: selector %q has non-printable characters", ErrInvalid, s.Type)
	}
	return nil
}

// CompareSelectors orders selectors by type, then value.
func CompareSelectors(a, b Selector) int {
	if c := strings.Compare(a.Type, b.Type); c != 0 {
		return c
	}
	return strings.Compare(a.Value, b.Value)
}

// NormalizeSelectors returns a sorted, deduplicated copy of sels.
func NormalizeSelectors(sels []Selector) []Selector {
	out := slices.Clone(sels)
	slices.SortFunc(out, CompareSelectors)
	return slices.Compact(out)
}

// validateSelectors checks every selector and the count; empty is allowed
// only when allowEmpty.
func validateSelectors(sels []Selector, allowEmpty bool) error {
	if len(sels) == 0 && !allowEmpty {
		return fmt.Errorf("%w: at least one selector is required", ErrInvalid)
	}
	if len(sels) > maxSelectors {
		return fmt.Errorf("%w: more than %d selectors", ErrInvalid, maxSelectors)
	}
	for _, s := range sels {
		if err := s.Validate(); err != nil {
			return err
		}
	}
	return nil
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}
