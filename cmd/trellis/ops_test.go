package main

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
)

func TestPprofNeedsMetricsAddress(t *testing.T) {
	cfg := emptyConfig(t)
	for _, args := range [][]string{
		{"agent", "--server=https://x:6443", "--token=t", "--node-name=n", "--enable-pprof", cfg},
		{"server", "--node-name=n", "--enable-pprof", cfg},
	} {
		err := run(t.Context(), args, io.Discard, io.Discard, func(string) string { return "" })
		if err == nil || !strings.Contains(err.Error(), "--metrics-address") {
			t.Errorf("%v: err = %v, want one that asks for --metrics-address", args, err)
		}
	}
}

func TestMetricsEndpointServesPprofOnlyWhenAsked(t *testing.T) {
	for _, pprof := range []bool{false, true} {
		// A free loopback port.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		stop, err := startMetrics(t.Context(), opsFlags{metricsAddr: addr, pprof: pprof}, slog.New(slog.DiscardHandler), processRegistry())
		if err != nil {
			t.Fatal(err)
		}
		for path, want := range map[string]int{
			"/metrics":               200,
			"/debug/pprof/":          map[bool]int{false: 404, true: 200}[pprof],
			"/debug/pprof/goroutine": map[bool]int{false: 404, true: 200}[pprof],
		} {
			resp, err := http.Get("http://" + addr + path)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("pprof=%v: GET %s = %d, want %d: %.200s", pprof, path, resp.StatusCode, want, body)
			}
		}
		stop()
	}
}
