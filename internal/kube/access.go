package kube

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	authnv1client "k8s.io/client-go/kubernetes/typed/authentication/v1"
	authzv1client "k8s.io/client-go/kubernetes/typed/authorization/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
)

// clients are the typed clients of the API groups Trellis calls: not the
// whole clientset, whose client of every API group doubles the size of
// the trellis binary (54 → 104 MB).
type clients struct {
	core  corev1client.CoreV1Interface
	authz authzv1client.AuthorizationV1Interface
	authn authnv1client.AuthenticationV1Interface
}

func newClients(rc *rest.Config, hc *http.Client) (clients, error) {
	var c clients
	var err error
	if c.core, err = corev1client.NewForConfigAndClient(rc, hc); err != nil {
		return c, err
	}
	if c.authz, err = authzv1client.NewForConfigAndClient(rc, hc); err != nil {
		return c, err
	}
	c.authn, err = authnv1client.NewForConfigAndClient(rc, hc)
	return c, err
}

// permission is one verb on one resource that Trellis needs.
type permission struct {
	verb, resource, subresource string
	namespace                   string // "" for cluster-scoped resources
}

func (p permission) String() string {
	r := p.resource
	if p.subresource != "" {
		r += "/" + p.subresource
	}
	return p.verb + " " + r
}

// permissions are every call the controller makes: the ClusterRole in
// deploy/kubernetes/rbac.yaml grants exactly these.
var permissions = []permission{
	{verb: "get", resource: "nodes"},
	{verb: "list", resource: "nodes"},
	{verb: "watch", resource: "nodes"},
	{verb: "patch", resource: "nodes"},
	{verb: "patch", resource: "nodes", subresource: "status"},
	{verb: "create", resource: "events", namespace: eventNamespace},
	{verb: "patch", resource: "events", namespace: eventNamespace},
}

// Permissions lists what the Trellis server needs in Kubernetes, one
// "verb resource[/subresource]" each: the rules of the ClusterRole in
// deploy/kubernetes/rbac.yaml.
func Permissions() []string {
	out := make([]string, len(permissions))
	for i, p := range permissions {
		out[i] = p.String()
	}
	return out
}

// rbacHint says how to grant what is missing.
const rbacHint = "apply the ClusterRole and ClusterRoleBinding of deploy/kubernetes/rbac.yaml (nodes: get, list, watch, patch; nodes/status: patch; events: create, patch) and bind the ClusterRole to the identity of the kubeconfig"

// ForbiddenError says which permission Kubernetes denied, to whom, and
// how to grant it.
type ForbiddenError struct {
	User       string // "" if unknown
	Permission string // e.g. "patch nodes/status"
	Err        error  // the API's error, if any
}

func (e *ForbiddenError) Error() string {
	who := "the identity of the kubeconfig"
	if e.User != "" {
		who = "user " + e.User
	}
	return fmt.Sprintf("Kubernetes does not allow %s to %s: %s", who, e.Permission, rbacHint)
}

func (e *ForbiddenError) Unwrap() error { return e.Err }

// checkAccess asks the API server, for each permission, whether this
// client has it (SelfSubjectAccessReview). It returns a *ForbiddenError
// naming the first one missing, or the error that kept it from asking.
func checkAccess(ctx context.Context, c clients) (user string, err error) {
	user = whoAmI(ctx, c)
	var missing []string
	for _, p := range permissions {
		r, err := c.authz.SelfSubjectAccessReviews().Create(ctx, &authzv1.SelfSubjectAccessReview{
			Spec: authzv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{
				Namespace: p.namespace, Verb: p.verb, Resource: p.resource, Subresource: p.subresource,
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			return user, fmt.Errorf("ask Kubernetes whether Trellis may %s: %w", p, err)
		}
		if !r.Status.Allowed {
			missing = append(missing, p.String())
		}
	}
	if len(missing) > 0 {
		return user, &ForbiddenError{User: user, Permission: strings.Join(missing, ", ")}
	}
	return user, nil
}

// whoAmI returns the user name Kubernetes sees this client as, or "".
func whoAmI(ctx context.Context, c clients) string {
	r, err := c.authn.SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return ""
	}
	return r.Status.UserInfo.Username
}

// explain turns a 403 from the API server into a *ForbiddenError naming
// what was denied; other errors pass unchanged.
func explain(err error, user string, p permission) error {
	if err == nil || !apierrors.IsForbidden(err) {
		return err
	}
	var fe *ForbiddenError
	if errors.As(err, &fe) {
		return err
	}
	return &ForbiddenError{User: user, Permission: p.String(), Err: err}
}
