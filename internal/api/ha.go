package api

// Highly available servers: the servers of a cluster, and how a server
// joins the embedded etcd cluster of another.

// Server is one server of the cluster, as agents learn it.
type Server struct {
	// Name is the server's node name.
	Name string `json:"name"`
	// URL is where agents reach it (its first external IP, else its node
	// IP).
	URL string `json:"url"`
}

// PathEtcdMembers lists the embedded etcd members (GET) and adds the
// calling server as one (POST, EtcdJoinRequest → EtcdJoinResponse). Both
// need the server token as a bearer token: they hand out the cluster CA
// and its key, which no agent token may obtain.
const PathEtcdMembers = "/v1/etcd/members"

// EtcdMember is one member of the embedded etcd cluster.
type EtcdMember struct {
	Name     string   `json:"name"`
	PeerURLs []string `json:"peerURLs"`
}

// EtcdMembersResponse answers GET PathEtcdMembers.
type EtcdMembersResponse struct {
	// Embedded is false when the cluster's datastore is not an embedded
	// etcd cluster (SQLite, PostgreSQL or an external etcd).
	Embedded bool         `json:"embedded"`
	Members  []EtcdMember `json:"members"`
}

// EtcdJoinRequest asks a server to add the caller to its embedded etcd
// cluster. PeerURL empty asks only for the cluster CA (servers sharing an
// external datastore).
type EtcdJoinRequest struct {
	Name    string `json:"name"`
	PeerURL string `json:"peerURL,omitempty"`
}

// EtcdJoinResponse answers POST PathEtcdMembers.
type EtcdJoinResponse struct {
	// InitialCluster is the etcd initial cluster string the new member
	// starts with; empty when PeerURL was empty.
	InitialCluster string `json:"initialCluster,omitempty"`
	// CACert and CAKey are the cluster CA (PEM): every server issues
	// node certificates from the same CA.
	CACert []byte `json:"caCert"`
	CAKey  []byte `json:"caKey"`
}

// PathServerLeave makes the server that serves it leave the cluster
// (POST, admin): its registration, its node and its embedded etcd member
// are removed; the server must be stopped afterwards.
const PathServerLeave = "/v1/servers/leave"

// ServerLeaveResponse answers POST PathServerLeave.
type ServerLeaveResponse struct {
	// Server is the name of the server that left.
	Server string `json:"server"`
	// EtcdMemberRemoved tells whether an embedded etcd member was removed.
	EtcdMemberRemoved bool `json:"etcdMemberRemoved"`
}
