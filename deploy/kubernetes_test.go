package deploy

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// manifests reads every object of deploy/kubernetes/*.yaml, by kind.
func manifests(t *testing.T) map[string][]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes: %v", err)
	}
	out := map[string][]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range strings.Split(string(b), "\n---\n") {
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil || tm.Kind == "" {
				t.Fatalf("%s: a document without a kind: %v", f, err)
			}
			out[tm.Kind] = append(out[tm.Kind], doc)
		}
	}
	return out
}

// TestClusterRoleIsWhatTrellisNeeds: the ClusterRole grants exactly the
// calls the Trellis server makes (kube.Permissions), no more.
func TestClusterRoleIsWhatTrellisNeeds(t *testing.T) {
	docs := manifests(t)["ClusterRole"]
	if len(docs) != 1 {
		t.Fatalf("%d ClusterRoles, want 1", len(docs))
	}
	var role rbacv1.ClusterRole
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &role); err != nil {
		t.Fatal(err)
	}
	var granted []string
	for _, r := range role.Rules {
		if len(r.APIGroups) != 1 || r.APIGroups[0] != "" || len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: want the core group, no resource names, no URLs", r)
		}
		for _, res := range r.Resources {
			for _, v := range r.Verbs {
				granted = append(granted, v+" "+res)
			}
		}
	}
	need := kube.Permissions()
	slices.Sort(granted)
	slices.Sort(need)
	if !slices.Equal(granted, need) {
		t.Fatalf("the ClusterRole grants %q; Trellis needs exactly %q", granted, need)
	}
}

// TestDaemonSets: both run on every node (tolerations), on the host's
// network, privileged, with /dev/net/tun, the CNI config dir and the data
// dir from the host, node-critical, named after their Node; agents carry
// no service account token.
func TestDaemonSets(t *testing.T) {
	docs := manifests(t)["DaemonSet"]
	if len(docs) != 2 {
		t.Fatalf("%d DaemonSets, want the server's and the agents'", len(docs))
	}
	for _, doc := range docs {
		var ds appsv1.DaemonSet
		if err := yaml.UnmarshalStrict([]byte(doc), &ds); err != nil {
			t.Fatal(err)
		}
		t.Run(ds.Name, func(t *testing.T) {
			spec := ds.Spec.Template.Spec
			if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" {
				t.Errorf("hostNetwork %v, priorityClassName %q", spec.HostNetwork, spec.PriorityClassName)
			}
			if !slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool { return tl.Operator == corev1.TolerationOpExists && tl.Key == "" }) {
				t.Errorf("tolerations %+v: want one that tolerates every taint", spec.Tolerations)
			}
			c := spec.Containers[0]
			if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
				t.Error("not privileged")
			}
			paths := map[string]string{}
			for _, v := range spec.Volumes {
				if v.HostPath != nil {
					paths[v.HostPath.Path] = v.Name
				}
			}
			for _, p := range []string{"/dev/net/tun", "/etc/cni/net.d", "/var/lib/trellis"} {
				if paths[p] == "" || !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == paths[p] && m.MountPath == p }) {
					t.Errorf("host path %s is not mounted at the same path", p)
				}
			}
			nodeName := false
			for _, e := range c.Env {
				nodeName = nodeName || (e.Name == "TRELLIS_NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName")
			}
			if !nodeName {
				t.Error("TRELLIS_NODE_NAME is not the Node's name (spec.nodeName): Trellis matches nodes by name")
			}
			agent := slices.Contains(c.Args, "agent")
			if agent && (spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken) {
				t.Error("agents never talk to Kubernetes: automountServiceAccountToken must be false")
			}
			if !agent && spec.ServiceAccountName != "trellis" {
				t.Errorf("the server runs as service account %q, want trellis (rbac.yaml)", spec.ServiceAccountName)
			}
		})
	}
}

// TestManifestsApply: the real API server accepts every manifest
// (kubectl apply --dry-run=server).
func TestManifestsApply(t *testing.T) {
	kubetest.Require(t, "kubectl")
	env := kubetest.Start(t, kubetest.Options{})
	out, err := env.Kubectl(t, "apply", "--dry-run=server", "-f", "kubernetes/")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -f deploy/kubernetes/: %v\n%s", err, out)
	}
	for _, want := range []string{"serviceaccount/trellis", "clusterrole.rbac.authorization.k8s.io/trellis", "clusterrolebinding.rbac.authorization.k8s.io/trellis",
		"configmap/trellis", "daemonset.apps/trellis-server", "daemonset.apps/trellis-agent"} {
		if !strings.Contains(out, want+" created (server dry run)") {
			t.Errorf("kubectl apply does not say %s was created:\n%s", want, out)
		}
	}
	t.Logf("kubectl apply --dry-run=server -f deploy/kubernetes/:\n%s", out)
}
