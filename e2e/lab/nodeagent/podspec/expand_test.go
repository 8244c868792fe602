package podspec

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestExpand(t *testing.T) {
	vars := map[string]string{
		"A":     "a",
		"B":     "b",
		"EMPTY": "",
		"REF":   "$(A)",
	}
	tests := []struct {
		name, in, want string
	}{
		{"no reference", "plain", "plain"},
		{"empty input", "", ""},
		{"whole string", "$(A)", "a"},
		{"repeated", "$(A)-$(A)", "a-a"},
		{"at start", "$(A)-1", "a-1"},
		{"in the middle", "__$(B)__", "__b__"},
		{"at end", "__$(B)", "__b"},
		{"compound", "$(A)_$(B)", "a_b"},
		{"empty value", "x$(EMPTY)y", "xy"},
		{"unknown var left as is", "$(NOPE)", "$(NOPE)"},
		{"unknown next to known", "$(NOPE)$(A)", "$(NOPE)a"},
		{"escaped reference", "$$(A)", "$(A)"},
		{"escaped then expanded", "$$(A)_$(B)", "$(A)_b"},
		{"escaped unknown", "$$(NOPE)", "$(NOPE)"},
		{"double dollar alone", "a$$b", "a$b"},
		{"three dollars expand", "$$$(A)", "$a"},
		{"six dollars, known", "$$$$$$(A)", "$$$(A)"},
		{"seven dollars, known", "$$$$$$$(A)", "$$$a"},
		{"seven dollars, unknown", "$$$$$$$(NOPE)", "$$$$(NOPE)"},
		{"value not expanded again", "$(REF)", "$(A)"},
		{"bare operator", "$A", "$A"},
		{"shell braces ignored", "${A}", "${A}"},
		{"shell specials pass through", "$?_$!", "$?_$!"},
		{"trailing operator kept", "$(A)$", "a$"},
		{"unclosed reference", "x$(A", "x$(A"},
		{"unclosed after a reference", "$(B)__$(", "b__$("},
		{"many unclosed", "--$($($(--", "--$($($(--"},
		{"nested reference not expanded", "$(A$(B))", "$(A$(B))"},
		{"nested unclosed", "$(A$(B)", "$(A$(B)"},
		{"escape inside a name", "$(a$$b)", "$(a$$b)"},
		{"missing opener", "$A)", "$A)"},
		{"backslash is not an escape", `x\$(A)`, `x\a`},
		{"parenthesis without operator", "(A)", "(A)"},
		{"operator before multibyte rune", "$€-$(A)", "$€-a"},
		{"operator before CJK", "$中文", "$中文"},
		{"newline", "\n", "\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Expand(tc.in, lookupIn(vars)); got != tc.want {
				t.Errorf("Expand(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestLookupInOrder(t *testing.T) {
	l := lookupIn(map[string]string{"X": "first"}, map[string]string{"X": "second", "Y": "y"})
	if v, _ := l("X"); v != "first" {
		t.Errorf("X = %q, want the first map's value", v)
	}
	if v, ok := l("Y"); !ok || v != "y" {
		t.Errorf("Y = %q, %v; want the second map's value", v, ok)
	}
	if _, ok := l("Z"); ok {
		t.Error("Z found in neither map")
	}
}

func TestExpandCommand(t *testing.T) {
	tests := []struct {
		name              string
		c                 corev1.Container
		env               []string
		wantCmd, wantArgs []string
	}{
		{
			name: "nothing to expand",
			c:    corev1.Container{Command: []string{"/bin/sleep"}, Args: []string{"1"}},
			env:  []string{"A=a"}, wantCmd: []string{"/bin/sleep"}, wantArgs: []string{"1"},
		},
		{
			name:    "command and args",
			c:       corev1.Container{Command: []string{"/bin/$(BIN)"}, Args: []string{"--port=$(PORT)", "$$(PORT)", "$(UNSET)"}},
			env:     []string{"BIN=server", "PORT=8080"},
			wantCmd: []string{"/bin/server"}, wantArgs: []string{"--port=8080", "$(PORT)", "$(UNSET)"},
		},
		{
			name:     "value with equals sign",
			c:        corev1.Container{Args: []string{"$(OPTS)"}},
			env:      []string{"OPTS=a=b"},
			wantArgs: []string{"a=b"},
		},
		{name: "empty container"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd, args := ExpandCommand(&tc.c, tc.env)
			if !slices.Equal(cmd, tc.wantCmd) || !slices.Equal(args, tc.wantArgs) {
				t.Errorf("ExpandCommand = %q %q, want %q %q", cmd, args, tc.wantCmd, tc.wantArgs)
			}
		})
	}
}
