// Package e2e holds Ironroot's end-to-end tests: the real ironroot-server,
// ironroot-agent and ironroot-sim binaries, built once per test binary, run
// as subprocesses against software TPMs (swtpm, EK certificates from a
// private CA) and SoftHSM2 tokens, and are driven through their command
// lines and the SPIFFE Workload API as operators and workloads use them.
//
// The harness (harness_test.go) kills every process it starts when its test
// ends, also on failure, and puts each process's stderr in the test log when
// the test failed. Under `go test -race` (as `make test` runs it) the
// binaries are built with -race as well, and a data race they report fails
// the test. The tests need swtpm and SoftHSM2 (`make deps`) and fail, never
// skip, without them.
package e2e
