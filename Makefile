# Every target sets itself up: `make serve` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/*/*/*/*.proto protos/inference/*.proto)
PROTO_OUT := serving/proto
PROTO_STAMP := $(PROTO_OUT)/.generated
EXTRAS ?= serving,client,training,dev

.PHONY: install proto serve test clean lock compose-up compose-down train train-fast average export quantize evaluate cost

install: $(STAMP)

# Rebuilt only when the pins change, so `make serve` never reinstalls a current .venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

proto: $(PROTO_STAMP)

# Generated stubs live in the package and are never edited by hand (nor committed). The same
# script generates them for the images and for `pip install .` (setup.py's build hook).
$(PROTO_STAMP): $(PROTO_SRC) tools/generate_protos.py $(STAMP)
	rm -rf $(PROTO_OUT)
	$(PY) tools/generate_protos.py $(PROTO_OUT)
	touch $@

serve: $(PROTO_STAMP)
	$(PY) -m serving $(ARGS)

# The Open Inference Protocol tests run from their own venv (see test-v2 below).
TRITON_VENV := .venv-triton
TRITON_PY := $(TRITON_VENV)/bin/python
TRITON_STAMP := $(TRITON_VENV)/.installed

test: $(PROTO_STAMP) $(TRITON_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(TRITON_PY) -m pytest tests_v2 $(V2_PYTEST_ARGS)

# ---- Open Inference Protocol (KServe V2) tests, driven by Triton's own client --------------
# tritonclient needs protobuf < 7 and the server's .venv has 7, so the client gets its own venv
# (full pins in tests_v2/requirements.txt); the servers under test still run from .venv.
.PHONY: test-v2

$(TRITON_STAMP): tests_v2/requirements.txt
	test -x $(TRITON_PY) || $(PYTHON_BASE) -m venv $(TRITON_VENV)
	echo '*' > $(TRITON_VENV)/.gitignore  # never committed
	$(TRITON_PY) -m pip install -q --upgrade pip==25.3
	$(TRITON_PY) -m pip install -q -r tests_v2/requirements.txt
	touch $@

test-v2: $(PROTO_STAMP) $(TRITON_STAMP)
	$(TRITON_PY) -m pytest tests_v2 $(V2_PYTEST_ARGS)

clean:
	rm -rf $(PROTO_OUT) .pytest_cache

lock:
	$(PY) -m pip freeze --exclude-editable | sed 's/_/-/g' > constraints.txt

# ---- training (needs the `training` extra, installed by `make install`) -------------------
RUN ?= runs/default
NAME ?= cifar10
VERSION ?= 2
MODEL ?= models/cifar10/2/model.onnx

train: $(STAMP)
	$(PY) -m training.train --recipe default --run-dir runs/default $(ARGS)

train-fast: $(STAMP)
	$(PY) -m training.train --recipe fast --run-dir runs/fast $(ARGS)

# Stochastic weight averaging on top of a finished run (training/average.py): ~40 min here.
PARENT ?= runs/long
average: $(STAMP)
	$(PY) -m training.average --parent $(PARENT) --run-dir $(PARENT)-swa $(ARGS)

export: $(STAMP)
	$(PY) -m training.export --run-dir $(RUN) --name $(NAME) --version $(VERSION) $(ARGS)

quantize: $(STAMP)
	$(PY) -m training.quantize --source models/$(NAME)/$(VERSION) --name $(NAME)-int8 --version $(VERSION)

evaluate: $(STAMP)
	$(PY) -m training.evaluate $(MODEL) $(ARGS)

# Inference cost per image against a ResNet-20 reference, timed in the same run (training/cost.py);
# on a quiet machine. ARGS=--write puts it in the cards.
COST_MODELS ?= models/cifar10/1 models/cifar10/2 models/cifar10-int8/2
cost: $(STAMP)
	$(PY) -m training.cost $(COST_MODELS) $(ARGS)

# ---- containers (docs/deploy.md) ----------------------------------------------------------
# docker/engine.py picks the engine that answers here (docker with a daemon, else podman) and the
# base it can get: the official python image, else a local Debian base (debootstrap, built once
# per machine, kept in the engine's image store like every layer).
# `make image`: cifar10-serving:cpu. `make test-container`: build it and run it (marker
# `container`; skips only when no engine can start a container). `make compose-up`: the image,
# then the classifier + Prometheus (+ Grafana where its image can be had) via compose.
.PHONY: image test-container

image:
	$(PYTHON_BASE) docker/engine.py build

test-container: $(PROTO_STAMP) $(TRITON_STAMP)
	$(PY) -m pytest -m container -s -rs $(PYTEST_ARGS)

compose-up: $(STAMP)
	$(PY) docker/engine.py compose up

compose-down: $(STAMP)
	$(PY) docker/engine.py compose down

# ---- benchmarks (bench/README.md): make bench BENCH_MODE=quick|full -----------------------
# The peer (MLServer 1.7.1) needs protobuf < 7, so it gets its own venv, every package pinned
# in bench/mlserver/requirements.txt; the load generators and our server run from .venv.
.PHONY: bench bench-venvs bench-profile bench-tune bench-test bench-client
BENCH_MODE ?= quick
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): pyproject.toml constraints.txt $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS),bench]"
	touch $@

$(MLSERVER_STAMP): bench/mlserver/requirements.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON_BASE) -m venv $(MLSERVER_VENV)
	echo '*' > $(MLSERVER_VENV)/.gitignore  # never committed
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(MLSERVER_VENV)/bin/python -m pip install -q -r bench/mlserver/requirements.txt
	touch $@

bench-venvs: $(BENCH_STAMP) $(MLSERVER_STAMP)

bench: $(PROTO_STAMP) $(BENCH_STAMP) $(MLSERVER_STAMP)
	$(PY) -m bench --mode $(BENCH_MODE) $(BENCH_ARGS)

# The client-bulk row alone (bench/client_bulk.py): the bulk CLI on 10,000 PNG files (quick: 1,000)
# beside ClassifyStream PNG load on the same server, paired -> bench/results/client-$(BENCH_MODE)/.
bench-client: $(PROTO_STAMP) $(BENCH_STAMP)
	$(PY) -m bench --mode $(BENCH_MODE) --out bench/results/client-$(BENCH_MODE) \
		--skip limit,startup,ours,limit-after-rows,naive-raw,int8-raw,shadow $(BENCH_ARGS)

bench-profile: $(PROTO_STAMP) $(BENCH_STAMP)
	$(PY) -m bench.profile $(BENCH_ARGS)

bench-tune: $(PROTO_STAMP) $(BENCH_STAMP)
	$(PY) -m bench.tune $(BENCH_ARGS)

# The harness's own tests (real servers, the peer when its venv exists); about 30 s.
bench-test: $(PROTO_STAMP) $(BENCH_STAMP) $(MLSERVER_STAMP)
	$(PY) -m pytest bench/tests $(PYTEST_ARGS)

# ---- reliability: soak/overload/fault tests and the image-decoder fuzzer -------------------
# `make soak`: the `slow` tests (64-client soak, overload, deadlines/cancel under load, SIGTERM
# under load); SOAK_SECONDS=120 by default. `make fuzz`: atheris on the image decoder for
# FUZZ_SECONDS (corpus and crash files under .venv/fuzz, out of git; a finding fails the target).
SOAK_SECONDS ?= 120
FUZZ_SECONDS ?= 60
FUZZ_DIR ?= $(VENV)/fuzz
FUZZ_STAMP := $(VENV)/.fuzz-installed
.PHONY: soak fuzz

soak: $(PROTO_STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -m slow -s tests/test_soak.py $(PYTEST_ARGS)

$(FUZZ_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[fuzz]"
	touch $@

fuzz: $(PROTO_STAMP) $(FUZZ_STAMP)
	mkdir -p $(FUZZ_DIR)/corpus
	$(PY) fuzz/fuzz_images.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
		-artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/corpus
