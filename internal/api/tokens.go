package api

import "time"

// TokenCreateRequest asks for a new join token (POST PathTokens).
type TokenCreateRequest struct {
	// TTL in seconds; 0 means the token does not expire.
	TTL         int64  `json:"ttl,omitempty"`
	Description string `json:"description,omitempty"`
}

// TokenInfo describes a created join token (the answers of PathTokens
// and PathTokensRotateServer); Token is set only in the answer to its
// creation or rotation.
type TokenInfo struct {
	ID          string    `json:"id"`
	Description string    `json:"description,omitempty"`
	CreatedAt   time.Time `json:"createdAt"`
	ExpiresAt   time.Time `json:"expiresAt,omitzero"`
	Token       string    `json:"token,omitempty"`
}
