package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/trellis-mesh/trellis/internal/agent"
)

// watchReload reads the settings again on every SIGHUP (command line,
// environment and config files, with the usual precedence) and delivers
// the ones an agent takes without a restart. A bad config file is logged
// and changes nothing. The goroutine ends with ctx.
func watchReload(ctx context.Context, log *slog.Logger, read func() ([]netip.Addr, error)) <-chan agent.Reload {
	out := make(chan agent.Reload)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			ext, err := read()
			if err != nil {
				log.Error("reload on SIGHUP failed; keeping the current settings", "err", err)
				continue
			}
			log.Info("reloaded settings on SIGHUP", "nodeExternalIPs", ext)
			select {
			case out <- agent.Reload{ExternalIPs: ext}:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// rereadExternalIPs parses args again with a fresh flag set from build
// and returns --node-external-ip.
func rereadExternalIPs(build func() (*flag.FlagSet, *nodeFlags), args []string, getenv func(string) string) func() ([]netip.Addr, error) {
	return func() ([]netip.Addr, error) {
		fs, n := build()
		fs.SetOutput(io.Discard)
		if err := parse(fs, args, getenv, &n.config); err != nil {
			return nil, err
		}
		return parseAddrs("node-external-ip", n.externalIPs)
	}
}
