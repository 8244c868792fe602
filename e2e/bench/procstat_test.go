package bench

import (
	"os"
	"testing"
)

func TestProcCPU(t *testing.T) {
	tests := []struct {
		name      string
		stat      string
		wantCPU   float64
		wantStart uint64
		wantErr   bool
	}{
		{
			name:      "plain name",
			stat:      "1234 (ztunnel) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 98765 1000 200 18446744073709551615",
			wantCPU:   3, // (250+50)/100
			wantStart: 98765,
		},
		{
			name:      "name with spaces and parentheses",
			stat:      "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 42 0 0",
			wantCPU:   0.03,
			wantStart: 42,
		},
		{name: "truncated", stat: "7 (x) R 1 2 3", wantErr: true},
		{name: "no name", stat: "garbage", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cpu, start, err := procCPU(tc.stat)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err == nil && (cpu != tc.wantCPU || start != tc.wantStart) {
				t.Errorf("procCPU = %v, %v; want %v, %v", cpu, start, tc.wantCPU, tc.wantStart)
			}
		})
	}
}

func TestProcStatusKB(t *testing.T) {
	status := "Name:\tztunnel\nVmPeak:\t 1300000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n"
	tests := []struct {
		name, key string
		want      uint64
		wantErr   bool
	}{
		{name: "rss", key: "VmRSS", want: 10240},
		{name: "peak", key: "VmHWM", want: 20480},
		{name: "missing", key: "VmSwap", wantErr: true},
		{name: "not kB", key: "Threads", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := procStatusKB(status, tc.key)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("procStatusKB(%s) = %v, %v; want %v (error %v)", tc.key, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// TestSelf reads this process's own accounting, as the harness reads a
// tunnel's.
func TestSelf(t *testing.T) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	_, start, err := procCPU(string(b))
	if err != nil {
		t.Fatal(err)
	}
	p := Proc{Role: "self", PID: os.Getpid(), StartTime: start}
	if _, err := p.cpu(); err != nil {
		t.Error(err)
	}
	if kb, err := p.memKB("VmRSS"); err != nil || kb == 0 {
		t.Errorf("VmRSS = %d, %v", kb, err)
	}
}
