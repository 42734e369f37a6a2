package kvcache

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"time"
)

// Tokens stop being valid in ways the invalidation watch and the auth revision do not show: a simple token expires
// --auth-token-ttl after its last use (each use renews it), a JWT token at its exp claim. So an answer cached for a
// caller with credentials lives at most Options.TokenCheck from the time the read that filled it was sent, and never
// past a JWT token's exp: the caller's next read after that goes to etcd, which answers with the token's fate (and
// renews a simple token, as the caller's reads straight to etcd would). Nothing is added to the hit path: the bound
// is the entry's ccache TTL.

// jwtExpiry returns the exp claim of tok if it is a JWT token (etcd's have one). Only the payload is decoded: tok
// was accepted by etcd for the read that fills the entry, so its claims are etcd's.
func jwtExpiry(tok string) (time.Time, bool) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *float64 `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	sec := int64(*claims.Exp)
	return time.Unix(sec, int64((*claims.Exp-float64(sec))*1e9)), true
}
