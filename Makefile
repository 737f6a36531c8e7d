# polyarch: `make demo` installs everything and compiles + runs MiniLM on cpu + vulkan;
# `make test` runs every test (lit + FileCheck pass tests and pytest).
VENV := .venv
STAMP := $(VENV)/.polyarch-setup

.PHONY: setup demo test lit bench audit clean

$(STAMP): requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

# TEST_WORKERS=2 (the default) runs the test files on two processes (pytest-xdist; a file's
# tests stay on one worker; the host's devices are calibrated once before they start, see
# test/conftest.py); TEST_WORKERS=0 runs them in this process, in order.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile test

lit: $(STAMP)
	$(VENV)/bin/lit -v test/passes

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_minilm.py
	$(VENV)/bin/python bench/placement_truth.py
	$(VENV)/bin/python bench/cpu_zoo.py
	$(VENV)/bin/python bench/cost_model.py
	$(VENV)/bin/python bench/plan_regret.py --profile out/bench/profile.json
	$(VENV)/bin/python bench/bundle_load.py
	$(VENV)/bin/python bench/stream.py
	$(VENV)/bin/python bench/ray_overhead.py
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt  # llama.cpp: builds from source
	$(VENV)/bin/python bench/generate.py
	$(VENV)/bin/python bench/speculative.py
	$(VENV)/bin/python bench/fleet.py
	$(VENV)/bin/python bench/serve_load.py

audit: $(STAMP)
	$(VENV)/bin/python scripts/audit.py

clean:
	rm -rf out test/passes/Output .pytest_cache
