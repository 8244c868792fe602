package authz

// Problem is one part of a policy that ztunnel cannot enforce as written. The
// policy is still translated (fail closed, see the package doc); the
// controller writes the Problems into the policy's status so that nothing is
// silently ignored.
type Problem struct {
	// Field is the path of the offending field, relative to the object, in
	// the YAML spelling users write: "spec.rules[0].to[0].operation.methods",
	// "spec.action", "metadata.annotations[istio.io/dry-run]".
	Field string
	// Message says what cannot be enforced, what Ambit does instead and what
	// the user can do about it.
	Message string
}

func (p Problem) String() string {
	return p.Field + ": " + p.Message
}
