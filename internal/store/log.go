package store

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"

	"github.com/sirupsen/logrus"
	"go.uber.org/zap/zapcore"
)

// Kine logs through logrus's process-wide logger, which the store cannot
// hand a *slog.Logger. kineLog bridges the two: the first store that starts
// kine points logrus's output at nothing, sets its level to Info (so kine
// skips building Trace messages) and adds a hook that forwards each entry
// to the logger of the most recently started kine that is still running.
// Entries logged while no kine runs are dropped. Kine's Info messages are
// chatty start-up and compaction reports and go out at Debug.
//
// logrus.Fatal still exits the process after the entry has been forwarded;
// kine calls it only when its own invariants break.
var kineLog kineLogBridge

type kineLogBridge struct {
	once  sync.Once
	mu    sync.Mutex
	sinks []*kineLogSink // guarded by mu; the last one receives entries
}

type kineLogSink struct{ log *slog.Logger }

// attachKineLog routes kine's log to l until the returned function is
// called.
func attachKineLog(l *slog.Logger) (detach func()) {
	b := &kineLog
	b.once.Do(func() {
		logrus.SetOutput(io.Discard)
		logrus.SetLevel(logrus.InfoLevel)
		logrus.AddHook(b)
	})
	sink := &kineLogSink{log: l}
	b.mu.Lock()
	b.sinks = append(b.sinks, sink)
	b.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if i := slices.Index(b.sinks, sink); i >= 0 {
				b.sinks = slices.Delete(b.sinks, i, i+1)
			}
		})
	}
}

// Levels implements logrus.Hook.
func (b *kineLogBridge) Levels() []logrus.Level { return logrus.AllLevels }

// Fire implements logrus.Hook.
func (b *kineLogBridge) Fire(e *logrus.Entry) error {
	b.mu.Lock()
	var l *slog.Logger
	if n := len(b.sinks); n > 0 {
		l = b.sinks[n-1].log
	}
	b.mu.Unlock()
	if l == nil {
		return nil
	}
	var level slog.Level
	switch e.Level {
	case logrus.PanicLevel, logrus.FatalLevel, logrus.ErrorLevel:
		level = slog.LevelError
	case logrus.WarnLevel:
		level = slog.LevelWarn
	default:
		level = slog.LevelDebug
	}
	ctx := e.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if !l.Enabled(ctx, level) {
		return nil
	}
	attrs := make([]slog.Attr, 0, len(e.Data))
	for k, v := range e.Data {
		attrs = append(attrs, slog.Any(k, v))
	}
	l.LogAttrs(ctx, level, e.Message, attrs...)
	return nil
}

// slogCore is a zapcore.Core that writes to a slog.Handler, so that the
// etcd client (which logs through zap) logs where the store does. zap's
// Info goes out at Debug: the client reports routine reconnections there.
type slogCore struct {
	h slog.Handler
}

func newSlogCore(h slog.Handler) zapcore.Core { return slogCore{h: h} }

func zapLevel(l zapcore.Level) slog.Level {
	switch {
	case l >= zapcore.ErrorLevel:
		return slog.LevelError
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	default:
		return slog.LevelDebug
	}
}

func (c slogCore) Enabled(l zapcore.Level) bool {
	return c.h.Enabled(context.Background(), zapLevel(l))
}

func (c slogCore) With(fields []zapcore.Field) zapcore.Core {
	return slogCore{h: c.h.WithAttrs(zapAttrs(fields))}
}

func (c slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c slogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	r := slog.NewRecord(e.Time, zapLevel(e.Level), e.Message, 0)
	r.AddAttrs(zapAttrs(fields)...)
	if e.LoggerName != "" {
		r.AddAttrs(slog.String("logger", e.LoggerName))
	}
	return c.h.Handle(context.Background(), r)
}

func (c slogCore) Sync() error { return nil }

func zapAttrs(fields []zapcore.Field) []slog.Attr {
	if len(fields) == 0 {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fields {
		f.AddTo(enc)
	}
	attrs := make([]slog.Attr, 0, len(enc.Fields))
	for k, v := range enc.Fields {
		if err, ok := v.(error); ok {
			v = err.Error()
		}
		if s, ok := v.(fmt.Stringer); ok {
			v = s.String()
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	return attrs
}
