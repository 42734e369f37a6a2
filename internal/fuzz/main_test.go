package fuzz_test

import (
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, proxytest.LeakOptions()...) }
