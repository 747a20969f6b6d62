package probe

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"
)

func TestPingLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a raw ICMP socket")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, dst := range []string{"127.0.0.1", "::1"} {
		res, err := Ping(ctx, netip.MustParseAddr(dst), Options{Count: 2, LargeSize: 1400})
		if err != nil {
			if dst == "::1" {
				t.Logf("IPv6 loopback: %v (skipped)", err)
				continue
			}
			t.Fatalf("ping %s: %v", dst, err)
		}
		if res.Sent != 2 || res.Received != 2 || res.RTT <= 0 || !res.LargeOK || res.LargeSize != 1400 {
			t.Errorf("ping %s: got %+v, want 2 of 2 replies, an RTT and the large probe answered", dst, res)
		}
	}
}

func TestPingTooLarge(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a raw ICMP socket")
	}
	// The loopback MTU is 65536: a larger packet cannot leave unfragmented.
	_, err := Ping(context.Background(), netip.MustParseAddr("127.0.0.1"), Options{Count: 1, LargeSize: 65535 + 10})
	if err == nil {
		t.Fatal("want an error for a probe larger than the interface MTU")
	}
}
