package kube

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// TestUnreachable: only a failure to reach the API server (or its own
// "not now") is retried patiently and lets the server start without it;
// an answer (a denial, bad credentials, an expired version) is not.
func TestUnreachable(t *testing.T) {
	nodes := schema.GroupResource{Resource: "nodes"}
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{refused, true},
		{fmt.Errorf("list nodes: %w", refused), true},
		{context.DeadlineExceeded, true},
		{errors.New("x509: certificate signed by unknown authority"), true},
		{apierrors.NewServiceUnavailable("starting"), true},
		{apierrors.NewTooManyRequests("busy", 1), true},
		{apierrors.NewForbidden(nodes, "", errors.New("no")), false},
		{apierrors.NewUnauthorized("bad token"), false},
		{apierrors.NewResourceExpired("too old"), false},
		{&ForbiddenError{Permission: "patch nodes"}, false},
		{fmt.Errorf("start: %w", &ForbiddenError{Permission: "patch nodes"}), false},
	} {
		if got := unreachable(tc.err); got != tc.want {
			t.Errorf("unreachable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestForbiddenSentence(t *testing.T) {
	err := explain(apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "a", errors.New("denied")), "system:serviceaccount:kube-system:trellis", permPatchStatus)
	var fe *ForbiddenError
	if !errors.As(err, &fe) || !apierrors.IsForbidden(err) {
		t.Fatalf("explain gave %v", err)
	}
	for _, want := range []string{"system:serviceaccount:kube-system:trellis", "patch nodes/status", "deploy/kubernetes/rbac.yaml"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %q", err, want)
		}
	}
	if err := explain(errors.New("other"), "", permPatchNode); err.Error() != "other" {
		t.Errorf("explain changed another error: %v", err)
	}
	if got := strings.Join(Permissions(), ","); got != "get nodes,list nodes,watch nodes,patch nodes,patch nodes/status,create events,patch events" {
		t.Errorf("Permissions() = %s", got)
	}
}
