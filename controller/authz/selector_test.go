package authz

import "testing"

func TestSelectorMatches(t *testing.T) {
	tests := []struct {
		name     string
		selector map[string]string
		labels   map[string]string
		want     bool
	}{
		{"nil selector selects all", nil, map[string]string{"app": "x"}, true},
		{"empty selector selects all", map[string]string{}, nil, true},
		{"one label", map[string]string{"app": "x"}, map[string]string{"app": "x", "v": "1"}, true},
		{"all labels", map[string]string{"app": "x", "v": "1"}, map[string]string{"app": "x", "v": "1"}, true},
		{"missing label", map[string]string{"app": "x", "v": "1"}, map[string]string{"app": "x"}, false},
		{"other value", map[string]string{"app": "x"}, map[string]string{"app": "y"}, false},
		{"empty value must be present", map[string]string{"canary": ""}, map[string]string{"app": "x"}, false},
		{"empty value present", map[string]string{"canary": ""}, map[string]string{"canary": ""}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := SelectorMatches(tc.selector, tc.labels); got != tc.want {
				t.Errorf("SelectorMatches = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSelectsWorkload(t *testing.T) {
	api := map[string]string{"app": "api"}
	tests := []struct {
		name      string
		policy    string
		namespace string
		labels    map[string]string
		want      bool
	}{
		{"selector in the pod's namespace", `
metadata: {name: p, namespace: shop}
spec: {selector: {matchLabels: {app: api}}}`, "shop", api, true},
		{"selector does not match", `
metadata: {name: p, namespace: shop}
spec: {selector: {matchLabels: {app: web}}}`, "shop", api, false},
		{"selector in another namespace", `
metadata: {name: p, namespace: other}
spec: {selector: {matchLabels: {app: api}}}`, "shop", api, false},
		{"selector in the root namespace applies everywhere", `
metadata: {name: p, namespace: istio-system}
spec: {selector: {matchLabels: {app: api}}}`, "shop", api, true},
		{"namespace-wide policies are not listed", `
metadata: {name: p, namespace: shop}
spec: {}`, "shop", api, false},
		{"selector without labels is namespace-wide, not listed", `
metadata: {name: p, namespace: shop}
spec: {selector: {matchLabels: {}}}`, "shop", api, false},
		{"waypoint policies are not listed", `
metadata: {name: p, namespace: shop}
spec: {targetRefs: [{kind: Service, group: "", name: api}]}`, "shop", api, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := SelectsWorkload(authorizationPolicy(t, tc.policy), root, tc.namespace, tc.labels); got != tc.want {
				t.Errorf("SelectsWorkload = %v, want %v", got, tc.want)
			}
		})
	}
	if SelectsWorkload(nil, root, "shop", api) {
		t.Error("SelectsWorkload(nil) = true")
	}
	if got := PolicyKey("shop", "p"); got != "shop/p" {
		t.Errorf("PolicyKey = %q", got)
	}
}
