# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use: torch (scripts/install_torch.py:
# the CPU build from PyTorch's CPU index where no GPU is present and that index answers, else
# the default index's build), then this package with its worker and dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override with e.g. TORCH_SPEC="torch" (any version) or install your own torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) scripts/install_torch.py "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[worker,dev]"
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pravaha demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/pravaha bench
	$(PY) -m benchmarks.host
	$(PY) -m benchmarks.spec_decode
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/gateway.py --clients 1000

# Real redis-servers and workers killed, frozen and restarted; exits 1 on anything lost or duplicated.
chaos: $(STAMP)
	$(PY) benchmarks/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
