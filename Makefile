# Two commands a newcomer needs: `make install`, then `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU-only machines get a CPU build of torch: a local wheel when pip's find-links has one,
# else PyTorch's CPU index. GPU machines (nvidia-smi present) get PyPI's CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_WORKERS  ?= 2

.PHONY: install test acceptance bench lint clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch>=2.4"; \
	else \
		if $(PIP) install -q --no-deps --no-index "torch>=2.4" 2>/dev/null; then \
			$(PIP) install -q "torch==$$($(PIP) show torch | sed -n 's/^Version: //p')"; \
		else \
			$(PIP) install -q "torch>=2.4" --index-url $(TORCH_CPU_INDEX); \
		fi; \
	fi
	$(PIP) install -q -e ".[dev]"
	$(PY) -c "import torch, triton, ray, pyarrow, nsa; print('nsa', nsa.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

test:
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

acceptance:
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(VENV)/bin/nsa verify --scale full && \
		$(VENV)/bin/nsa verify trainability --scale full; \
	else \
		$(VENV)/bin/nsa verify --scale ci; \
	fi

bench:
	$(VENV)/bin/nsa bench

lint:
	$(VENV)/bin/ruff check nsa verify cli suites tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
