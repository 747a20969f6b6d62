package store_test

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/store"
)

func benchStore(b *testing.B) *store.Store {
	b.Helper()
	s, err := store.Open(b.Context(), store.Config{DataDir: b.TempDir(), Logger: testLogger()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// BenchmarkCreate measures one Create (a compare-and-swap transaction)
// against kine+SQLite, one writer.
func BenchmarkCreate(b *testing.B) {
	s := benchStore(b)
	ctx := b.Context()
	v := []byte(`{"name":"node-1","wireguardKey":"9W6nTHpQcBeZ8hF7nMjS+1vYb3c6O4gF1tS0aZkVnH0=","podCIDR":"10.42.1.0/24"}`)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := s.Create(ctx, "/bench/create/"+strconv.Itoa(i), v); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWatchLatency measures the time from the start of a write to the
// arrival of its watch event, and reports p50, p99 and the maximum.
func BenchmarkWatchLatency(b *testing.B) {
	s := benchStore(b)
	ctx, cancel := context.WithCancel(b.Context())
	defer cancel()
	ch := s.Watch(ctx, "/bench/watch/", 0)
	<-ch // the initial reset
	// The first write after kine starts reaches watchers up to one
	// PollInterval late: kine's poll loop spends its first wake-up
	// preparing its query. Measure the steady state.
	if _, err := s.Create(ctx, "/bench/watch/warm-up", nil); err != nil {
		b.Fatal(err)
	}
	<-ch
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		start := time.Now()
		if _, err := s.Create(ctx, "/bench/watch/"+strconv.Itoa(i), []byte("v")); err != nil {
			b.Fatal(err)
		}
		select {
		case ev := <-ch:
			if ev.Type != store.EventPut {
				b.Fatalf("event %v", ev.Type)
			}
		case <-time.After(10 * time.Second):
			b.Fatal("no event")
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-µs")
	}
}
