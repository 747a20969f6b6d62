package client

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/k3s-io/kine/pkg/logstructured/sqllog.(*SQLLog).compactor"))
}
