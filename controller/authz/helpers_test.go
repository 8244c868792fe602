package authz

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

const (
	root = "istio-system"
	td   = "cluster.local"
)

// authorizationPolicy decodes a YAML AuthorizationPolicy the way the API
// server's JSON reaches the controller.
func authorizationPolicy(t testing.TB, y string) *securityv1.AuthorizationPolicy {
	t.Helper()
	var p securityv1.AuthorizationPolicy
	if err := yaml.UnmarshalStrict([]byte(y), &p); err != nil {
		t.Fatalf("decoding AuthorizationPolicy: %v\n%s", err, y)
	}
	return &p
}

func peerAuthentication(t testing.TB, y string) *securityv1.PeerAuthentication {
	t.Helper()
	var p securityv1.PeerAuthentication
	if err := yaml.UnmarshalStrict([]byte(y), &p); err != nil {
		t.Fatalf("decoding PeerAuthentication: %v\n%s", err, y)
	}
	return &p
}

// authorization parses the expected Authorization from prototext; "" is nil.
func authorization(t testing.TB, text string) *security.Authorization {
	t.Helper()
	if strings.TrimSpace(text) == "" {
		return nil
	}
	var a security.Authorization
	if err := prototext.Unmarshal([]byte(text), &a); err != nil {
		t.Fatalf("parsing expected Authorization: %v\n%s", err, text)
	}
	return &a
}

func assertAuthorization(t *testing.T, got *security.Authorization, want string) {
	t.Helper()
	w := authorization(t, want)
	if (got == nil) != (w == nil) || !proto.Equal(got, w) {
		t.Errorf("Authorization:\ngot:  %s\nwant: %s", text(got), text(w))
	}
	assertNoEmptyMatch(t, got)
}

func text(a *security.Authorization) string {
	if a == nil {
		return "<nil>"
	}
	return prototext.MarshalOptions{}.Format(a)
}

// assertNoEmptyMatch checks the invariant ztunnel's evaluation depends on:
// a Match with no field never matches there, so translation never emits one.
func assertNoEmptyMatch(t *testing.T, a *security.Authorization) {
	t.Helper()
	for _, g := range a.GetGroups() {
		for _, r := range g.GetRules() {
			if len(r.GetMatches()) == 0 {
				t.Errorf("Rules with no matches in %s", text(a))
			}
			for _, m := range r.GetMatches() {
				if emptyMatch(m) {
					t.Errorf("empty Match in %s", text(a))
				}
			}
		}
	}
}

// problemFields returns the sorted fields of problems.
func problemFields(ps []Problem) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.Field
	}
	slices.Sort(out)
	return out
}

func assertProblems(t *testing.T, got []Problem, wantFields []string, wantText ...string) {
	t.Helper()
	want := slices.Clone(wantFields)
	slices.Sort(want)
	if gotFields := problemFields(got); !slices.Equal(gotFields, want) {
		t.Errorf("Problem fields = %q, want %q\n%v", gotFields, want, got)
	}
	for _, s := range wantText {
		found := false
		for _, p := range got {
			if strings.Contains(p.Message, s) {
				found = true
			}
		}
		if !found {
			t.Errorf("no Problem message contains %q: %v", s, got)
		}
	}
}
