// Command benchnet is the bench's TCP load inside the lab's pods (package
// netload): `benchnet serve` in the server pod, `benchnet send` (bulk
// throughput), `benchnet conns` (connection rate) and `benchnet rr` (round
// trips on one connection) run with kubectl exec
// in the client pod, printing one JSON result on stdout.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/e2e/bench/netload"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "benchnet: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: benchnet serve|send|conns|rr [flags]")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet("benchnet "+args[0], flag.ContinueOnError)
	switch args[0] {
	case "serve":
		sink := fs.String("sink", ":5001", "bulk sink address (empty: none)")
		echo := fs.String("echo", ":5002", "echo address for the connection rate and round trips (empty: none)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		return netload.Serve(ctx, *sink, *echo)
	case "send":
		to := fs.String("to", "", "sink address, host:port")
		streams := fs.Int("streams", 1, "parallel streams")
		d := fs.Duration("d", 5*time.Second, "duration")
		warmup := fs.Duration("warmup", 0, "left out of the rate (default: a fifth of -d, at most 1s)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *warmup == 0 {
			*warmup = min(*d/5, time.Second)
		}
		res, err := netload.Send(ctx, *to, *streams, *d, *warmup)
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(res)
	case "conns":
		to := fs.String("to", "", "echo address, host:port")
		workers := fs.Int("c", 8, "parallel connections")
		d := fs.Duration("d", 3*time.Second, "duration")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		res, err := netload.Conns(ctx, *to, *workers, *d)
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(res)
	case "rr":
		to := fs.String("to", "", "echo address, host:port")
		size := fs.Int("size", 1024, "message size, bytes")
		d := fs.Duration("d", 3*time.Second, "duration")
		warmup := fs.Duration("warmup", 0, "left out (default: a fifth of -d, at most 1s)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *warmup == 0 {
			*warmup = min(*d/5, time.Second)
		}
		res, err := netload.RoundTrips(ctx, *to, *size, *d, *warmup)
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(res)
	default:
		return fmt.Errorf("unknown subcommand %q: want serve, send, conns or rr", args[0])
	}
}
