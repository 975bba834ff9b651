package workloadapi

import (
	"errors"
	"strings"
)

// Selector is one property of a workload, such as unix:uid:1000: Type is the
// attestor ("unix"), Value the rest ("uid:1000").
type Selector struct {
	Type  string
	Value string
}

// String returns the selector as "type:value".
func (s Selector) String() string { return s.Type + ":" + s.Value }

// ParseSelector parses "type:value", e.g. "unix:uid:1000".
func ParseSelector(s string) (Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok || typ == "" || value == "" {
		return Selector{}, errors.New("selector must have the form type:value")
	}
	return Selector{Type: typ, Value: value}, nil
}
