package workloadapi

import (
	"fmt"
	"net"
	"os"
	"testing"
	"time"
)

// helperDialEnv makes the test binary a helper process: it connects to the
// unix socket named by the variable and waits to be killed, so that tests can
// read the credentials of a process other than themselves.
const helperDialEnv = "IRONROOT_WORKLOADAPI_TEST_DIAL"

func TestMain(m *testing.M) {
	if path := os.Getenv(helperDialEnv); path != "" {
		c, err := net.Dial("unix", path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(2)
		}
		defer c.Close()
		time.Sleep(time.Hour)
		return
	}
	os.Exit(m.Run())
}
