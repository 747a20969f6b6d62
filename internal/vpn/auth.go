package vpn

import (
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
)

// Supported lists the provider names --vpn-auth accepts.
var Supported = []string{"tailscale"}

// Keys of --vpn-auth.
const (
	keyName             = "name"
	keyJoinKey          = "joinKey"
	keyControlServerURL = "controlServerURL"
	keyExtraArgs        = "extraArgs"
)

var knownKeys = []string{keyName, keyJoinKey, keyControlServerURL, keyExtraArgs}

// managedArgs are `tailscale up` flags that Trellis sets itself; extraArgs
// may not give them.
var managedArgs = map[string]string{
	"--authkey":          "use joinKey",
	"--auth-key":         "use joinKey",
	"--login-server":     "use controlServerURL",
	"--advertise-routes": "Trellis adds the pod CIDRs to the routes the node advertises already; set your own routes with 'tailscale set --advertise-routes' before starting Trellis",
}

// Auth is a parsed --vpn-auth value:
//
//	name=tailscale,joinKey=KEY[,controlServerURL=URL][,extraArgs=ARGS]
//
// Pairs are separated by commas; a value runs from the first '=' of its
// pair to the next comma, so it may contain '=' but not ','. extraArgs
// holds several `tailscale up` arguments separated by spaces (as in K3s),
// e.g. extraArgs=--hostname=edge-1 --accept-dns=false.
type Auth struct {
	// Name is the provider, one of Supported.
	Name string
	// JoinKey is the secret the node joins the VPN with (a Tailscale auth
	// key or a headscale pre-auth key). String and LogValue hide it.
	JoinKey string
	// ControlServerURL is a self-hosted control server (headscale); empty
	// means the provider's default.
	ControlServerURL string
	// ExtraArgs are passed to `tailscale up`.
	ExtraArgs []string
}

// String describes a with the join key hidden.
func (a Auth) String() string {
	s := fmt.Sprintf("name=%s,joinKey=<hidden>", a.Name)
	if a.ControlServerURL != "" {
		s += ",controlServerURL=" + a.ControlServerURL
	}
	if len(a.ExtraArgs) > 0 {
		s += ",extraArgs=" + strings.Join(a.ExtraArgs, " ")
	}
	return s
}

// LogValue implements slog.LogValuer: a logged Auth never shows the key.
func (a Auth) LogValue() slog.Value { return slog.StringValue(a.String()) }

// GoString keeps the key out of %#v too.
func (a Auth) GoString() string { return "vpn.Auth{" + a.String() + "}" }

// identRE matches the keys an error message may quote: anything else a user
// typed in place of a key might be the secret.
var identRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9]{0,31}$`)

// Parse parses a --vpn-auth value. Errors name the offending key (or the
// position of the offending item) and never contain the join key.
func Parse(s string) (Auth, error) {
	var a Auth
	seen := map[string]bool{}
	s = strings.TrimSpace(s)
	if s == "" {
		return a, errors.New("--vpn-auth is empty: give name=tailscale,joinKey=<auth key>")
	}
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue // tolerate "a=b,,c=d" and a trailing comma
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			return Auth{}, fmt.Errorf("--vpn-auth: item %d is not key=value (values may contain '=' but not ','; keys are %s)", i+1, strings.Join(knownKeys, ", "))
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !slices.Contains(knownKeys, k) {
			if identRE.MatchString(k) {
				return Auth{}, fmt.Errorf("--vpn-auth: unknown key %q; the keys are %s", k, strings.Join(knownKeys, ", "))
			}
			return Auth{}, fmt.Errorf("--vpn-auth: item %d has an unknown key; the keys are %s", i+1, strings.Join(knownKeys, ", "))
		}
		if seen[k] {
			return Auth{}, fmt.Errorf("--vpn-auth: key %s is given twice", k)
		}
		seen[k] = true
		switch k {
		case keyName:
			a.Name = v
		case keyJoinKey:
			a.JoinKey = v
		case keyControlServerURL:
			a.ControlServerURL = v
		case keyExtraArgs:
			a.ExtraArgs = strings.Fields(v)
		}
	}
	return a, a.Validate()
}

// Validate checks a as Parse does.
func (a Auth) Validate() error {
	switch {
	case a.Name == "":
		return fmt.Errorf("--vpn-auth: key name is missing; give name=%s", strings.Join(Supported, " or name="))
	case !slices.Contains(Supported, a.Name):
		if identRE.MatchString(a.Name) {
			return fmt.Errorf("--vpn-auth: name=%s is not supported; supported: %s", a.Name, strings.Join(Supported, ", "))
		}
		return fmt.Errorf("--vpn-auth: the value of name is not supported; supported: %s", strings.Join(Supported, ", "))
	case a.JoinKey == "":
		return errors.New("--vpn-auth: key joinKey is missing or empty; give joinKey=<auth key> (a Tailscale auth key or headscale pre-auth key)")
	case strings.ContainsAny(a.JoinKey, " \t\r\n"):
		return errors.New("--vpn-auth: the value of joinKey contains white space; copy the key again")
	}
	if a.ControlServerURL != "" {
		u, err := url.Parse(a.ControlServerURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.User != nil {
			return fmt.Errorf("--vpn-auth: controlServerURL is not a valid URL: want http(s)://host[:port][/path] without user info, e.g. https://headscale.example.com")
		}
	}
	for _, arg := range a.ExtraArgs {
		if !strings.HasPrefix(arg, "-") {
			return fmt.Errorf("--vpn-auth: extraArgs: %q is not a flag; give `tailscale up` flags separated by spaces, e.g. extraArgs=--hostname=edge-1 --accept-dns=false", arg)
		}
		name, _, _ := strings.Cut(arg, "=")
		if why, ok := managedArgs["--"+strings.TrimLeft(name, "-")]; ok {
			return fmt.Errorf("--vpn-auth: extraArgs may not set %s: %s", name, why)
		}
	}
	return nil
}

// ReadFile parses the --vpn-auth-file at path: the same text as --vpn-auth,
// white space around it ignored. It warns on log if the file is readable by
// group or others, since it holds the join key.
func ReadFile(path string, log *slog.Logger) (Auth, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Auth{}, fmt.Errorf("--vpn-auth-file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Auth{}, fmt.Errorf("--vpn-auth-file: %s is not a regular file", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return Auth{}, fmt.Errorf("--vpn-auth-file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 && log != nil {
		log.Warn("the VPN auth file holds the join key but others can read it; run chmod 600 on it", "file", path, "mode", fi.Mode().Perm().String())
	}
	a, err := Parse(string(b))
	if err != nil {
		return Auth{}, fmt.Errorf("--vpn-auth-file %s: %w", path, err)
	}
	return a, nil
}
