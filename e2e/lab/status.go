package lab

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// BinDir is the directory of the lab's binaries.
func (l *Lab) BinDir() string { return l.opts.BinDir }

// KubectlDir is the directory holding the lab's kubectl.
func (l *Lab) KubectlDir() string { return filepath.Dir(l.Kubectl()) }

// PrintStatus writes the lab's processes and nodes.
//
// Everything goes through a tabwriter, and only its Flush is checked: a
// write that fails midway leaves its text buffered, so Flush writes it again
// and reports the failure. A line without a tab ends a table, so the header
// lines do not disturb the columns.
func (l *Lab) PrintStatus(ctx context.Context, w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "lab %q: %d nodes, up since %s\nKUBECONFIG=%s\n\n", l.state.Name, l.state.Nodes, l.state.Created.Format(time.RFC3339), l.state.Kubeconfig)
	fmt.Fprintln(tw, "PROCESS\tPID\tSTATE\tLOG")
	down := 0
	for _, p := range l.state.Procs {
		st := "running"
		if !p.Alive() {
			st = "EXITED"
			down++
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", p.Name, p.PID, st, p.Log)
	}
	// Flushed before asking the API server, which may not answer.
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("writing status: %w", err)
	}
	cs, err := l.Client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing nodes: %w", err)
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "NODE\tREADY\tINTERNAL-IP\tPOD-CIDR")
	for _, n := range nodes.Items {
		ready, ip := "Unknown", ""
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				ready = string(c.Status)
			}
		}
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ip = a.Address
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.Name, ready, ip, n.Spec.PodCIDR)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("writing status: %w", err)
	}
	if down > 0 {
		return fmt.Errorf("%d of the lab's processes have exited; see their logs", down)
	}
	return nil
}
