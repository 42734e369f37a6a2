package embedetcd

import (
	"strings"
	"sync/atomic"

	"go.uber.org/zap/zapcore"
)

// etcd's embed package logs, at error level with a stack trace, every server goroutine that returns when the
// member is closed ("setting up serving from embedded etcd failed": "http: Server closed", "mux: server closed",
// "use of closed network connection"), before it checks whether it is stopping. On a clean stop these are not
// errors: quietStop drops them, and only them, once Stop has begun.
type quietStop struct {
	zapcore.Core
	stopping *atomic.Bool
}

// closedErrors are the errors a closed listener or server returns; the messages etcd logs them with.
var closedErrors = []string{"use of closed network connection", "http: Server closed", "mux: server closed"}

func (q quietStop) With(fields []zapcore.Field) zapcore.Core {
	return quietStop{Core: q.Core.With(fields), stopping: q.stopping}
}

func (q quietStop) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if q.Enabled(e.Level) {
		return ce.AddCore(e, q)
	}
	return ce
}

func (q quietStop) Write(e zapcore.Entry, fields []zapcore.Field) error {
	if q.stopping.Load() && e.Level <= zapcore.ErrorLevel && closedError(fields) {
		return nil
	}
	return q.Core.Write(e, fields)
}

// closedError reports whether one of fields is an error a closed listener or server returns.
func closedError(fields []zapcore.Field) bool {
	for _, f := range fields {
		if f.Type != zapcore.ErrorType {
			continue
		}
		if err, ok := f.Interface.(error); ok {
			for _, s := range closedErrors {
				if strings.Contains(err.Error(), s) {
					return true
				}
			}
		}
	}
	return false
}
