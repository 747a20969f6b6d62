package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/trellis-mesh/trellis/internal/cli"
)

// runToken implements 'trellis token create|list|revoke|rotate'.
func runToken(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	const usage = "usage: trellis token create [--ttl 24h] [--description TEXT] | list [-o json] | revoke ID | rotate"
	if len(args) == 0 {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("token "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminFlags(fs)
	ttl := fs.Duration("ttl", 0, "lifetime of the token (0: no expiry)")
	desc := fs.String("description", "", "what the token is for")
	output := fs.String("o", "table", "output format: table or json")
	sub := args[0]
	var pos []string
	rest := args[1:]
	for len(rest) > 0 && len(rest[0]) > 0 && rest[0][0] != '-' {
		pos, rest = append(pos, rest[0]), rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	pos = append(pos, fs.Args()...)
	c, err := adminClient(fs, getenv)
	if err != nil {
		return err
	}
	switch sub {
	case "create":
		if *ttl < 0 {
			return errors.New("--ttl must not be negative")
		}
		ti, err := c.CreateToken(ctx, *ttl, *desc)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, ti.Token)
		return nil
	case "list":
		ts, err := c.Tokens(ctx)
		if err != nil {
			return err
		}
		return cli.PrintTokens(stdout, ts, *output, time.Now())
	case "revoke":
		if len(pos) == 0 {
			return errors.New("usage: trellis token revoke ID")
		}
		for _, id := range pos {
			if err := c.RevokeToken(ctx, id); err != nil {
				return fmt.Errorf("revoke token %s: %w", id, err)
			}
			fmt.Fprintf(stdout, "token %s revoked\n", id)
		}
		return nil
	case "rotate":
		ti, err := c.RotateServerToken(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, ti.Token)
		fmt.Fprintln(stderr, "the server token file is updated; joined nodes keep working; give new servers and agents this token")
		return nil
	}
	return errors.New(usage)
}
