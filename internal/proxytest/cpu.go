package proxytest

import (
	"syscall"
	"testing"
	"time"
)

// CPUPerOp starts counting the CPU time of this process (user and system, every goroutine: client, proxy and
// etcd, when all run in the test) and returns the function that reports it as cpu-µs/op, to be called once the
// benchmark's loop is done. Unlike ns/op it counts work done off the benchmark's goroutines (gRPC's transports,
// the workers of a cache), and not the time the machine's other processes take.
func CPUPerOp(b *testing.B) (report func()) {
	start := cpuTime()
	return func() {
		b.ReportMetric(float64((cpuTime()-start).Nanoseconds())/1e3/float64(b.N), "cpu-µs/op")
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
