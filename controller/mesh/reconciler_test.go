package mesh

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestEventNote(t *testing.T) {
	tests := []struct {
		name string
		msg  string
	}{
		{name: "short", msg: "rule 0: methods: not enforced at L4"},
		{name: "at the limit", msg: strings.Repeat("a", noteLimit)},
		{name: "over the limit", msg: strings.Repeat("a", noteLimit+1)},
		{name: "multi-byte rune at the cut", msg: strings.Repeat("é", noteLimit)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := eventNote(tc.msg)
			if len(got) > noteLimit {
				t.Errorf("len = %d, want at most %d", len(got), noteLimit)
			}
			if !utf8.ValidString(got) {
				t.Errorf("not valid UTF-8: %q", got[len(got)-50:])
			}
			if len(tc.msg) <= noteLimit && got != tc.msg {
				t.Errorf("a note that fits was changed: %q", got)
			}
			if len(tc.msg) > noteLimit && !strings.HasPrefix(tc.msg, strings.TrimSuffix(got, "... (see the ZtunnelAccepted condition)")) {
				t.Errorf("not a prefix of the message plus the pointer: %q", got)
			}
		})
	}
}
