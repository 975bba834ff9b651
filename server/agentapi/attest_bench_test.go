package agentapi_test

import "testing"

// BenchmarkAttest measures one whole attestation through the API: the
// agent's client on swtpm (AK creation, activation, quote, key creation
// and certification, CSR signed in the TPM) and the server (verifier, CA
// signing in SoftHSM, SQLite write), over one TLS connection. The node
// re-attests each iteration, so the stored-clock check runs too.
func BenchmarkAttest(b *testing.B) {
	e := newServer(b, nil)
	n := startNode(b, suite)
	client := e.dial()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := n.attest(client); err != nil {
			b.Fatal(err)
		}
	}
}
