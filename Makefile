# Fresh-machine set-up and the two everyday commands:  make demo  |  make test
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
ARCH   := $(shell uname -m)
# The CUDA build (it runs on the CPU too) that this project is tested with; aarch64 gets the CPU build.
ifeq ($(ARCH),aarch64)
TORCH   = torch==2.9.1 torchvision==0.24.1
else
TORCH   = torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo compare-demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,report,tensorboard,wandb,mlflow,stream]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/empssl train --preset cpu-demo --out runs/cpu-demo

# The paper's time-to-accuracy claim at CPU scale, about 30 min on one laptop core (docs/RESULTS.md): each method's
# own recipe scaled to the demo data (presets compare-demo-*), the same width and view size for all, 300 s each.
compare-demo: install
	$(VENV)/bin/empssl compare --recipes compare-demo --methods emp-ssl,simclr,vicreg,byol --width 8 \
	    --patch-size 16 --budget-seconds 300 --device cpu --monitor-bank 1000 --monitor-test 500 --targets 25,30,35,40 \
	    --out runs/compare-demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m pip install --quiet -e '.[lint]'
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

clean:
	rm -rf runs/cpu-demo runs/compare-demo data/cache
