package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// listFlag is a repeatable flag; each use may also hold a comma-separated
// list, as in K3s (--node-external-ip=a,b or --node-external-ip a
// --node-external-ip b).
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// envAliases are environment variables that do not follow the
// TRELLIS_<FLAG_NAME> rule.
var envAliases = map[string]string{
	"server": "TRELLIS_URL",
}

// envName is the environment variable that mirrors a flag:
// --node-external-ip ↔ TRELLIS_NODE_EXTERNAL_IP, --server ↔ TRELLIS_URL.
func envName(flagName string) string {
	if a, ok := envAliases[flagName]; ok {
		return a
	}
	return "TRELLIS_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// settle fills every flag not given on the command line from the
// environment, then from the config files: flags > env > file > defaults.
// files maps a file name to its keys, in the order they are read (later
// files override earlier ones).
func settle(fs *flag.FlagSet, getenv func(string) string, files []configFile) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	fromFile := map[string]fileValue{}
	for _, cf := range files {
		for k, v := range cf.values {
			if fs.Lookup(k) == nil {
				return fmt.Errorf("config file %s: unknown key %q (keys are the flag names of 'trellis %s', without dashes)", cf.path, k, fs.Name())
			}
			fromFile[k] = fileValue{path: cf.path, values: v}
		}
	}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] {
			return
		}
		if v := getenv(envName(f.Name)); v != "" {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("environment variable %s: %w", envName(f.Name), e)
			}
			return
		}
		if fv, ok := fromFile[f.Name]; ok {
			for _, v := range fv.values {
				if e := f.Value.Set(v); e != nil {
					err = fmt.Errorf("config file %s: key %q: %w", fv.path, f.Name, e)
					return
				}
			}
		}
	})
	return err
}

type fileValue struct {
	path   string
	values []string
}

// configFile is one parsed YAML config file: flag name → values.
type configFile struct {
	path   string
	values map[string][]string
}

// parseConfig parses a YAML config file whose keys are flag names and whose
// values are scalars or lists of scalars.
func parseConfig(path string, data []byte) (configFile, error) {
	cf := configFile{path: path, values: map[string][]string{}}
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return cf, fmt.Errorf("config file %s: %w", path, err)
	}
	for k, v := range raw {
		k = strings.TrimLeft(k, "-")
		switch x := v.(type) {
		case []any:
			for _, e := range x {
				s, err := scalar(e)
				if err != nil {
					return cf, fmt.Errorf("config file %s: key %q: %w", path, k, err)
				}
				cf.values[k] = append(cf.values[k], s)
			}
		default:
			s, err := scalar(x)
			if err != nil {
				return cf, fmt.Errorf("config file %s: key %q: %w", path, k, err)
			}
			cf.values[k] = append(cf.values[k], s)
		}
	}
	return cf, nil
}

func scalar(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case bool:
		return strconv.FormatBool(x), nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case nil:
		return "", nil
	}
	return "", fmt.Errorf("value must be a string, number, boolean or a list of them, not %T", v)
}

// loadConfigFiles reads path and then path.d/*.yaml in name order. A
// missing default file is not an error; a missing explicit one is.
func loadConfigFiles(path string, explicit bool) ([]configFile, error) {
	var out []configFile
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		cf, err := parseConfig(path, b)
		if err != nil {
			return nil, err
		}
		out = append(out, cf)
	case errors.Is(err, os.ErrNotExist) && !explicit:
	default:
		return nil, fmt.Errorf("read config file: %w", err)
	}
	dropins, _ := filepath.Glob(path + ".d/*.yaml")
	sort.Strings(dropins)
	for _, p := range dropins {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read config file: %w", err)
		}
		cf, err := parseConfig(p, b)
		if err != nil {
			return nil, err
		}
		out = append(out, cf)
	}
	return out, nil
}

func parseAddrs(flagName string, vals []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, v := range vals {
		a, err := netip.ParseAddr(v)
		if err != nil {
			return nil, fmt.Errorf("--%s=%s is not an IP address (example: --%s=203.0.113.20)", flagName, v, flagName)
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

func parsePrefixes(flagName string, vals []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range vals {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return nil, fmt.Errorf("--%s=%s is not a CIDR prefix (example: --%s=10.42.0.0/16)", flagName, v, flagName)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("--%s=%s has host bits set; did you mean %s?", flagName, v, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}
