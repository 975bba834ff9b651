package store

import "testing"

func TestRebind(t *testing.T) {
	tests := []struct {
		d    dialect
		in   string
		want string
	}{
		{dialect{name: "sqlite"}, `SELECT a FROM t WHERE b = ? AND c IN (?, ?)`, `SELECT a FROM t WHERE b = ? AND c IN (?, ?)`},
		{dialect{name: "postgres", dollarPlaceholders: true}, `SELECT a FROM t WHERE b = ? AND c IN (?, ?)`, `SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)`},
		{dialect{name: "postgres", dollarPlaceholders: true}, `SELECT 1`, `SELECT 1`},
	}
	for _, tt := range tests {
		if got := tt.d.rebind(tt.in); got != tt.want {
			t.Errorf("%s rebind(%q) = %q, want %q", tt.d.name, tt.in, got, tt.want)
		}
	}
}
