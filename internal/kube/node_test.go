package kube

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/api"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func TestNodePodCIDRs(t *testing.T) {
	v4 := prefixes("10.42.0.0/16")
	dual := prefixes("10.42.0.0/16", "fd00:42::/56")
	for _, tc := range []struct {
		name     string
		cluster  []netip.Prefix
		podCIDR  string
		podCIDRs []string
		want     string // joined prefixes, or "refused: <substring>"
	}{
		{"none yet", v4, "", nil, ""},
		{"kcm", v4, "10.42.3.0/24", []string{"10.42.3.0/24"}, "10.42.3.0/24"},
		{"only podCIDR (old API)", v4, "10.42.3.0/24", nil, "10.42.3.0/24"},
		{"dual stack", dual, "10.42.3.0/24", []string{"10.42.3.0/24", "fd00:42:0:3::/64"}, "10.42.3.0/24,fd00:42:0:3::/64"},
		{"dual stack, IPv6 first", dual, "fd00:42:0:3::/64", []string{"fd00:42:0:3::/64", "10.42.3.0/24"}, "10.42.3.0/24,fd00:42:0:3::/64"},
		{"foreign range", v4, "10.244.1.0/24", []string{"10.244.1.0/24"}, "refused: kube-controller-manager --cluster-cidr must equal trellis server --cluster-cidr=10.42.0.0/16"},
		{"wrong size", v4, "10.42.3.0/25", []string{"10.42.3.0/25"}, "refused: --node-cidr-mask-size-ipv4=24"},
		{"the whole range", v4, "10.42.0.0/16", []string{"10.42.0.0/16"}, "refused: not a /24"},
		{"wider than the range", v4, "10.0.0.0/8", []string{"10.0.0.0/8"}, "refused: not a /24"},
		{"IPv6 wrong size", dual, "10.42.3.0/24", []string{"10.42.3.0/24", "fd00:42:0:3::/80"}, "refused: --node-cidr-mask-size-ipv6=64"},
		{"IPv4 missing", dual, "fd00:42:0:3::/64", []string{"fd00:42:0:3::/64"}, "refused: no IPv4 pod CIDR"},
		{"IPv6 missing", dual, "10.42.3.0/24", []string{"10.42.3.0/24"}, "refused: no IPv6 pod CIDR"},
		{"IPv6 not served", v4, "10.42.3.0/24", []string{"10.42.3.0/24", "fd00:42:0:3::/64"}, "refused: outside the pod range"},
		{"two of one family", v4, "10.42.3.0/24", []string{"10.42.3.0/24", "10.42.4.0/24"}, "refused: two prefixes"},
		{"garbage", v4, "x", []string{"x"}, "refused: not a CIDR"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ref := nodePodCIDRs(&corev1.NodeSpec{PodCIDR: tc.podCIDR, PodCIDRs: tc.podCIDRs}, tc.cluster)
			if want, ok := strings.CutPrefix(tc.want, "refused: "); ok {
				if ref == nil || !strings.Contains(ref.message, want) {
					t.Fatalf("got %v, %+v; want a refusal saying %q", got, ref, want)
				}
				return
			}
			if ref != nil {
				t.Fatalf("refused: %s", ref.message)
			}
			if s := joinPrefixes(got); s != tc.want {
				t.Fatalf("got %q, want %q", s, tc.want)
			}
		})
	}
}

func TestAnnotationPatch(t *testing.T) {
	var k api.Key
	k[0] = 7
	m := &Member{PublicKey: k, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("203.0.113.1:51820"), netip.MustParseAddrPort("[2001:db8::1]:51820")}}
	want := wantAnnotations(m)
	if want[AnnotationEndpoints] != "203.0.113.1:51820,[2001:db8::1]:51820" || want[AnnotationPublicKey] != k.String() {
		t.Fatalf("wantAnnotations = %v", want)
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{"other": "x"}}}
	patch := annotationPatch(node, want)
	var p struct {
		Metadata struct {
			Annotations map[string]*string `json:"annotations"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(patch, &p); err != nil || len(p.Metadata.Annotations) != 2 || *p.Metadata.Annotations[AnnotationPublicKey] != k.String() {
		t.Fatalf("first patch %s (%v)", patch, err)
	}
	// Once the Node has them: no patch at all.
	node.Annotations[AnnotationPublicKey] = want[AnnotationPublicKey]
	node.Annotations[AnnotationEndpoints] = want[AnnotationEndpoints]
	if patch := annotationPatch(node, want); patch != nil {
		t.Fatalf("patch of a Node that has the annotations: %s", patch)
	}
	// A node behind NAT loses its endpoints: the annotation is removed,
	// the key stays, and nobody else's annotation is touched.
	m.Endpoints = nil
	patch = annotationPatch(node, wantAnnotations(m))
	if string(patch) != `{"metadata":{"annotations":{"trellis-mesh.io/endpoints":null}}}` {
		t.Fatalf("patch removing the endpoints: %s", patch)
	}
}

func TestConditionPatch(t *testing.T) {
	now := func() string { return "2026-12-02T06:00:00Z" }
	node := &corev1.Node{Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}}}
	patch := conditionPatch(node, upCondition(), now)
	var p struct {
		Status struct {
			Conditions []map[string]string `json:"conditions"`
		} `json:"status"`
	}
	if err := json.Unmarshal(patch, &p); err != nil || len(p.Status.Conditions) != 1 {
		t.Fatalf("patch %s (%v)", patch, err)
	}
	c := p.Status.Conditions[0]
	if c["type"] != "NetworkUnavailable" || c["status"] != "False" || c["reason"] != ConditionReasonUp || !strings.Contains(c["message"], "Trellis") || c["lastTransitionTime"] != now() {
		t.Fatalf("condition %v", c)
	}
	node.Status.Conditions = append(node.Status.Conditions, corev1.NodeCondition{Type: corev1.NodeNetworkUnavailable, Status: corev1.ConditionFalse, Reason: ConditionReasonUp, Message: conditionMessageUp})
	if patch := conditionPatch(node, upCondition(), now); patch != nil {
		t.Fatalf("patch of a Node that has the condition: %s", patch)
	}
	ref := &refusal{message: "pod CIDR 10.244.1.0/24 is outside"}
	patch = conditionPatch(node, refusedCondition(ref), now)
	if !strings.Contains(string(patch), `"status":"True"`) || !strings.Contains(string(patch), ConditionReasonRefused) || !strings.Contains(string(patch), "10.244.1.0/24") {
		t.Fatalf("refusal patch %s", patch)
	}
}

func TestPodCIDRPatch(t *testing.T) {
	b, err := podCIDRPatch("42", prefixes("10.42.3.0/24", "fd00:42:0:3::/64"))
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"metadata":{"resourceVersion":"42"},"spec":{"podCIDR":"10.42.3.0/24","podCIDRs":["10.42.3.0/24","fd00:42:0:3::/64"]}}` {
		t.Fatalf("patch %s", b)
	}
	if _, err := podCIDRPatch("42", nil); err == nil {
		t.Fatal("a patch without a CIDR")
	}
}

func TestParseAddressList(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		bad      bool
	}{
		{"", "", false},
		{"203.0.113.20", "203.0.113.20", false},
		{" 203.0.113.20 , 2001:db8::20 ", "203.0.113.20,2001:db8::20", false},
		{"203.0.113.20,203.0.113.20", "203.0.113.20", false},
		{"::ffff:203.0.113.20", "203.0.113.20", false},
		{"203.0.113.20,,", "203.0.113.20", false},
		{"127.0.0.1,203.0.113.20", "203.0.113.20", true},
		{"fe80::1%eth0", "", true},
		{"example.com", "", true},
		{"0.0.0.0,224.0.0.1,169.254.1.1", "", true},
	} {
		got, err := ParseAddressList(tc.in)
		var s []string
		for _, a := range got {
			s = append(s, a.String())
		}
		if strings.Join(s, ",") != tc.want || (err != nil) != tc.bad {
			t.Errorf("ParseAddressList(%q) = %v, %v; want %q, error %v", tc.in, s, err, tc.want, tc.bad)
		}
	}
}

// FuzzParseAddressList: whatever an annotation holds, the parser returns
// only usable, unmapped, distinct addresses, at most 16, and reads its own
// output back unchanged.
func FuzzParseAddressList(f *testing.F) {
	for _, s := range []string{"", "203.0.113.20", "203.0.113.20,2001:db8::1", " 1.2.3.4 ,,::ffff:5.6.7.8", "fe80::1%eth0", "127.0.0.1", strings.Repeat("10.0.0.1,", 40)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseAddressList(s)
		if len(got) > maxAddresses {
			t.Fatalf("%d addresses", len(got))
		}
		var parts []string
		for i, a := range got {
			if !a.IsValid() || a.Is4In6() || a.Zone() != "" || a.IsLoopback() || a.IsUnspecified() || a.IsMulticast() || a.IsLinkLocalUnicast() {
				t.Fatalf("unusable address %v from %q", a, s)
			}
			if slices.Contains(got[:i], a) {
				t.Fatalf("duplicate %v from %q", a, s)
			}
			parts = append(parts, a.String())
		}
		again, err2 := ParseAddressList(strings.Join(parts, ","))
		if err2 != nil || !slices.Equal(again, got) {
			t.Fatalf("round trip of %q: %v, %v (first %v, %v)", s, again, err2, got, err)
		}
		if err != nil && len(err.Error()) > 400 {
			t.Fatalf("error of %d bytes", len(err.Error()))
		}
	})
}
