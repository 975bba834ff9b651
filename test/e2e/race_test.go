//go:build race

package e2e

// raceEnabled: the tests run under -race, so the binaries are built with
// it too and a data race in the server or agent fails the test.
const raceEnabled = true
