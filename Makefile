# Two entry points, each creating its own virtual environment in .venv:
#   make demo   set up and run the main job: generate a video with radial attention on the
#               embedded tiny offline Wan pipeline (out.mp4)
#   make test   set up and run the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned first so pip takes the CPU build instead of a CUDA one.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo kernel-demo test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fastdit generate --attention radial -o out.mp4

kernel-demo: setup
	$(PY) examples/kernel_demo.py

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) *.egg-info
