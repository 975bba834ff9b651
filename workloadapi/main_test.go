package workloadapi

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"
)

// helperDialEnv makes the test binary a helper process: it connects to the
// unix socket named by the variable and waits to be killed, so that tests can
// read the credentials of a process other than themselves.
const helperDialEnv = "IRONROOT_WORKLOADAPI_TEST_DIAL"

// helperFetchEnv makes the test binary a Workload API client: it calls
// FetchX509SVID on the address in the variable and reports the outcome.
const helperFetchEnv = "IRONROOT_WORKLOADAPI_TEST_FETCH"

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
	if addr := os.Getenv(helperFetchEnv); addr != "" {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		svid, err := gsw.FetchX509SVID(ctx, gsw.WithAddr(addr))
		if err != nil {
			fmt.Println("error:", err)
			return
		}
		fmt.Println("svid:", svid.ID)
		return
	}
	os.Exit(m.Run())
}
