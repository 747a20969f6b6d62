package agent

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestWaitStateSaysOnceThenAtGrowingIntervals: nothing within the grace,
// then one line, then lines at 5 s, 10 s, 20 s…, and one line at the end.
func TestWaitStateSaysOnceThenAtGrowingIntervals(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var s waitState
	t0 := time.Unix(1000, 0)
	var logged []time.Duration
	for sec := 0; sec <= 60; sec++ {
		before := strings.Count(buf.String(), "waiting for")
		s.still(&waitLog{log: log, what: "the first WireGuard handshake"}, t0.Add(time.Duration(sec)*time.Second), "peers", 2)
		if strings.Count(buf.String(), "waiting for") > before {
			logged = append(logged, time.Duration(sec)*time.Second)
		}
	}
	want := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second}
	if len(logged) != len(want) {
		t.Fatalf("logged at %v, want %v:\n%s", logged, want, buf.String())
	}
	for i := range want {
		if logged[i] != want[i] {
			t.Fatalf("logged at %v, want %v", logged, want)
		}
	}
	if !strings.Contains(buf.String(), "waiting for the first WireGuard handshake") || !strings.Contains(buf.String(), "peers=2") {
		t.Errorf("the line must say what is waited for:\n%s", buf.String())
	}
	s.ended(t0.Add(61*time.Second), "first WireGuard handshake completed")
	s.ended(t0.Add(62*time.Second), "first WireGuard handshake completed")
	if n := strings.Count(buf.String(), "completed"); n != 1 {
		t.Errorf("the end is said %d times, want once", n)
	}
}

// TestWaitStateQuietWhenQuick: a wait shorter than the grace says nothing.
func TestWaitStateQuietWhenQuick(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var s waitState
	t0 := time.Unix(1000, 0)
	s.still(&waitLog{log: log, what: "x"}, t0)
	s.still(&waitLog{log: log, what: "x"}, t0.Add(time.Second))
	s.ended(t0.Add(2*time.Second), "done")
	if buf.Len() != 0 {
		t.Errorf("a quick wait logged:\n%s", buf.String())
	}
}
