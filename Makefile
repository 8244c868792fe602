# Ambit. `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

BIN            := $(CURDIR)/bin
KUBE_VERSION   := v1.36.0
KUBE_BIN       := $(BIN)/kube-$(KUBE_VERSION)
GOLANGCI_LINT  := v2.15.0
LAB_NAME       ?= ambit
LAB_NODES      ?= 2
GO_TEST_FLAGS  ?= -count=1
LINT_PKGS      ?= ./...
KUBE_LDFLAGS   := -s -w -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
                  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 \
                  -X k8s.io/component-base/version.gitTreeState=clean

export GOFLAGS := -buildvcs=false

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install missing Debian packages (as root on Debian; elsewhere print what to install).
	@hack/deps.sh

.PHONY: build
build: deps kube images ## Build every binary into bin/.
	go build -o $(BIN)/ ./cmd/lab ./cmd/controller ./cmd/ztunnel
	go build -o $(BIN)/ambit-cni ./cmd/cni
	go build -o $(BIN)/ambit-cni-agent ./cmd/cni-agent

# The Kubernetes release and etcd, built once from the module proxy and kept
# in bin/kube-<version>/. One multi-call binary links once instead of five.
.PHONY: kube
kube: $(KUBE_BIN)/hyperkube $(KUBE_BIN)/etcd

$(KUBE_BIN)/hyperkube: e2e/lab/kube/go.mod e2e/lab/kube/go.sum e2e/lab/kube/hyperkube/main.go
	@mkdir -p $(KUBE_BIN)
	@echo "build: Kubernetes $(KUBE_VERSION) (the first build takes several minutes)"
	@t=$$(date +%s); cd e2e/lab/kube && go build -ldflags "$(KUBE_LDFLAGS)" -o $@.tmp ./hyperkube && mv $@.tmp $@; \
	  echo "build: Kubernetes $(KUBE_VERSION) took $$(( $$(date +%s) - t ))s"
	@for c in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl; do ln -sf hyperkube $(KUBE_BIN)/$$c; done

$(KUBE_BIN)/etcd: e2e/lab/kube/go.mod e2e/lab/kube/go.sum
	@mkdir -p $(KUBE_BIN)
	@t=$$(date +%s); cd e2e/lab/kube && go build -ldflags "-s -w" -o $@.tmp go.etcd.io/etcd/server/v3 && mv $@.tmp $@; \
	  echo "build: etcd took $$(( $$(date +%s) - t ))s"

# What the lab's container images map to (see the README's image table).
.PHONY: images
images: $(BIN)/coredns $(BIN)/echo-server $(BIN)/echo-client

$(BIN)/coredns: e2e/lab/coredns/go.mod e2e/lab/coredns/go.sum e2e/lab/coredns/main.go
	@t=$$(date +%s); cd e2e/lab/coredns && go build -ldflags "-s -w" -o $@.tmp . && mv $@.tmp $@; \
	  echo "build: coredns took $$(( $$(date +%s) - t ))s"

$(BIN)/echo-server $(BIN)/echo-client &: e2e/apps/go.mod e2e/apps/go.sum
	@t=$$(date +%s); cd e2e/apps && go build -ldflags "-s -w" -o $(BIN)/echo-server istio.io/istio/pkg/test/echo/cmd/server && \
	  go build -ldflags "-s -w" -o $(BIN)/echo-client istio.io/istio/pkg/test/echo/cmd/client; \
	  echo "build: echo apps took $$(( $$(date +%s) - t ))s"

.PHONY: generate
generate: deps ## Regenerate committed generated files (Gateway API CRDs, workload API and ZDS protobuf, BPF objects).
	hack/gateway-api-crds.sh
	hack/istio-protos.sh
	hack/istio-crds.sh
	go generate ./bpf/...

.PHONY: verify
verify: generate ## Fail if `make generate` changes anything.
	@git diff --exit-code -- deploy api bpf || { echo "verify: generated files are stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- deploy api bpf)" || { git status --porcelain -- deploy api bpf; echo "verify: untracked generated files"; exit 1; }

.PHONY: lint
lint: $(BIN)/golangci-lint-$(GOLANGCI_LINT) ## go vet, and golangci-lint (pinned) with .golangci.yml; LINT_PKGS narrows it.
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$unformatted" || { echo "lint: not gofmt'ed (run gofmt -w):"; echo "$$unformatted"; exit 1; }
	go vet $(LINT_PKGS)
	$(BIN)/golangci-lint-$(GOLANGCI_LINT) run --config $(CURDIR)/.golangci.yml $(LINT_PKGS)

# Installed once per version, under a name that carries the version, so
# that bumping GOLANGCI_LINT installs the new one. go install names its
# output after the package, hence the staging directory.
$(BIN)/golangci-lint-$(GOLANGCI_LINT):
	GOBIN=$(BIN)/.golangci go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT)
	mv $(BIN)/.golangci/golangci-lint $@
	rmdir $(BIN)/.golangci

.PHONY: test
test: build ## Run every test: unit tests, then the lab end-to-end tests (root needed for the latter).
	go vet ./...
	AMBIT_BIN_DIR=$(BIN) go test $(GO_TEST_FLAGS) -timeout 25m ./...
	go -C e2e/interop test $(GO_TEST_FLAGS) ./...  # HBONE against Istio's own peers
	go -C e2e/bench vet ./...
	go -C e2e/bench build -o $(BIN)/ fortio.org/fortio ./cmd/benchnet  # what the bench runs in pods
	AMBIT_BIN_DIR=$(BIN) go -C e2e/bench test $(GO_TEST_FLAGS) -timeout 15m ./...  # make bench, smoke version

.PHONY: e2e
e2e: build ## Run only the lab end-to-end tests.
	AMBIT_BIN_DIR=$(BIN) go test $(GO_TEST_FLAGS) -timeout 25m -v ./e2e/...

.PHONY: demo
demo: build ## Bring the lab up with Ambit installed from deploy/, and leave it running.
	$(BIN)/lab up --name $(LAB_NAME) --nodes $(LAB_NODES)
	@hack/demo.sh $(BIN) /run/ambit-lab/$(LAB_NAME)/kubeconfig

.PHONY: demo-down
demo-down: ## Stop the demo lab and remove everything it made.
	@test ! -x $(BIN)/lab || $(BIN)/lab down --name $(LAB_NAME)

# make bench's knobs: runs per figure (each figure is their median), where
# the JSON goes, and more flags for bin/ambit-bench (`bin/ambit-bench -h`),
# e.g. BENCH_FLAGS=--capture-mode=nftables.
BENCH_RUNS     ?= 5
BENCH_OUT      ?= $(CURDIR)/bench-results.json
BENCH_FLAGS    ?=

.PHONY: bench
bench: build ## Measure Ambit against plain TCP and stunnel in a lab of its own: tables on stdout, JSON in BENCH_OUT (root).
	go -C e2e/bench build -o $(BIN)/ fortio.org/fortio ./cmd/benchnet ./cmd/ambit-bench
	$(BIN)/ambit-bench --bin-dir $(BIN) --runs $(BENCH_RUNS) --out $(BENCH_OUT) $(BENCH_FLAGS)

.PHONY: clean
clean: ## Remove bin/ except the cached Kubernetes release.
	find $(BIN) -maxdepth 1 -type f -delete 2>/dev/null || true
