package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/token"
)

// Join tokens beyond the server token: the agent token (--agent-token,
// joins agents only) and expiring tokens made with 'trellis token create'.
// A created token is K10<ca-hash>::node:<id>.<secret>; the store keeps the
// id and a hash of the secret, never the secret.
const prefixTokens = "/trellis/tokens/"

var tokenIDRE = regexp.MustCompile(`^[0-9a-f]{6}$`)

// joinToken is a created join token as stored.
type joinToken struct {
	ID          string    `json:"id"`
	Description string    `json:"description,omitempty"`
	SecretHash  string    `json:"secretHash"`
	CreatedAt   time.Time `json:"createdAt"`
	// ExpiresAt is zero for a token that does not expire.
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
}

// authorizeJoin checks a presented join token and returns what it may
// join: token.KindServer (servers and agents) or token.KindNode (agents).
func (s *Server) authorizeJoin(ctx context.Context, t token.Token) (token.Kind, bool) {
	if t.HasCAHash && !t.CAMatches(s.ca.CertPEM()) {
		return 0, false
	}
	s.tokenMu.RLock()
	serverTok, agentTok := s.token, s.agentToken
	s.tokenMu.RUnlock()
	if t.SecretMatches(serverTok.Secret) {
		return token.KindServer, true
	}
	if agentTok.Secret != "" && t.SecretMatches(agentTok.Secret) {
		return token.KindNode, true
	}
	id, secret, ok := strings.Cut(t.Secret, ".")
	if !ok || !tokenIDRE.MatchString(id) {
		return 0, false
	}
	b, _, err := s.store.Get(ctx, prefixTokens+id)
	if err != nil {
		return 0, false
	}
	var jt joinToken
	if json.Unmarshal(b, &jt) != nil || !passwordMatches(jt.SecretHash, secret) {
		return 0, false
	}
	if !jt.ExpiresAt.IsZero() && time.Now().After(jt.ExpiresAt) {
		return 0, false
	}
	return token.KindNode, true
}

func (s *Server) tokenRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST "+api.PathTokens, s.admin(s.handleCreateToken))
	mux.HandleFunc("GET "+api.PathTokens, s.admin(s.handleListTokens))
	mux.HandleFunc("DELETE "+api.PathTokens+"/{id}", s.admin(s.handleRevokeToken))
	mux.HandleFunc("POST "+api.PathTokensRotateServer, s.admin(s.handleRotateServerToken))
}

func (s *Server) handleCreateToken(w http.ResponseWriter, r *http.Request) {
	var req api.TokenCreateRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "malformed token request: "+err.Error())
		return
	}
	if req.TTL < 0 || len(req.Description) > 256 {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "ttl must be >= 0 and the description at most 256 characters")
		return
	}
	for range 5 {
		idb := make([]byte, 3)
		if _, err := rand.Read(idb); err != nil {
			writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
			return
		}
		id := hex.EncodeToString(idb)
		secret, err := token.GenerateSecret()
		if err != nil {
			writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
			return
		}
		secret = secret[:32]
		hash, err := hashPassword(secret)
		if err != nil {
			writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
			return
		}
		now := time.Now().UTC()
		jt := joinToken{ID: id, Description: req.Description, SecretHash: hash, CreatedAt: now}
		if req.TTL > 0 {
			jt.ExpiresAt = now.Add(time.Duration(req.TTL) * time.Second)
		}
		b, _ := json.Marshal(jt)
		if _, err := s.store.Create(r.Context(), prefixTokens+id, b); errors.Is(err, store.ErrExists) {
			continue
		} else if err != nil {
			writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "store the token: "+err.Error())
			return
		}
		s.log.Info("join token created", "id", id, "expiresAt", jt.ExpiresAt)
		tok := token.New(s.ca.CertPEM(), token.KindNode, id+"."+secret)
		writeJSON(w, http.StatusOK, api.TokenInfo{ID: id, Description: jt.Description, CreatedAt: now, ExpiresAt: jt.ExpiresAt, Token: tok.String()})
		return
	}
	writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "could not pick a free token id; try again")
}

func (s *Server) handleListTokens(w http.ResponseWriter, r *http.Request) {
	kvs, _, err := s.store.List(r.Context(), prefixTokens)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
		return
	}
	out := []api.TokenInfo{}
	for _, kv := range kvs {
		var jt joinToken
		if json.Unmarshal(kv.Value, &jt) != nil {
			continue
		}
		out = append(out, api.TokenInfo{ID: jt.ID, Description: jt.Description, CreatedAt: jt.CreatedAt, ExpiresAt: jt.ExpiresAt})
	}
	slices.SortFunc(out, func(a, b api.TokenInfo) int { return a.CreatedAt.Compare(b.CreatedAt) })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleRevokeToken(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !tokenIDRE.MatchString(id) {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, fmt.Sprintf("%q is not a token id; 'trellis token list' shows them", id))
		return
	}
	_, rev, err := s.store.Get(r.Context(), prefixTokens+id)
	if err == nil {
		err = s.store.Delete(r.Context(), prefixTokens+id, rev)
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, api.ErrCodeNotFound, fmt.Sprintf("there is no token %s; 'trellis token list' shows them", id))
	case err != nil:
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
	default:
		s.log.Info("join token revoked", "id", id)
		w.WriteHeader(http.StatusNoContent)
	}
}

// handleRotateServerToken replaces the server token's secret. Joined
// nodes keep working: after their join they use their node certificates.
// Servers started later need the new token (--token or the token file).
func (s *Server) handleRotateServerToken(w http.ResponseWriter, _ *http.Request) {
	secret, err := token.GenerateSecret()
	if err != nil {
		writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
		return
	}
	t := token.New(s.ca.CertPEM(), token.KindServer, secret)
	if err := pki.WriteFileAtomic(s.cfg.dir("token"), []byte(t.String()+"\n"), 0o600); err != nil {
		writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, "write token file: "+err.Error())
		return
	}
	s.tokenMu.Lock()
	s.token = t
	s.tokenMu.Unlock()
	s.log.Info("server token rotated; start servers with the new token (the token file is updated); joined nodes are not affected")
	writeJSON(w, http.StatusOK, api.TokenInfo{ID: "server", CreatedAt: time.Now().UTC(), Token: t.String()})
}
