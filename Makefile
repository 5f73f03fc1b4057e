# meshshield — make install | demo | test | bench | lint
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit bench clean proto native-test

# The native data plane (native/, Rust) is built into the package by maturin: a change
# to its sources reinstalls.
NATIVE := native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)

$(STAMP): pyproject.toml $(NATIVE)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshshield demo

lint: $(STAMP)
	$(VENV)/bin/ruff check meshshield tests bench
	$(VENV)/bin/mypy --strict meshshield/

test: lint native-test
	$(PY) -m pytest -q tests

# The crate's own tests and lints (debug build; the package holds the release one).
native-test:
	cd native && cargo clippy --all-targets --locked -- -D warnings
	cd native && cargo test --locked

bench: $(STAMP)
	$(PY) bench/cas_issue.py

# Regenerate the Workload API modules from meshshield/sidecar/spiffe_workload/workload.proto
# and the Envoy SDS messages from meshshield/_proto/envoy/**/*.proto with grpcio-tools, in a virtual environment of its own (the project's protobuf stays).
PROTO_VENV := .venv-proto
proto:
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install --quiet 'grpcio-tools==1.85.1'
	$(PROTO_VENV)/bin/python tools/gen_workload_proto.py
	$(PROTO_VENV)/bin/python -m pip install --quiet googleapis-common-protos
	$(PROTO_VENV)/bin/python tools/gen_envoy_proto.py

clean:
	rm -rf $(VENV) $(PROTO_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache native/target meshshield/_native*.so
