# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   install, then run the quickstart federated job (configs/quickstart.yaml)
#   make test   install, then run the test suite
VENV ?= .venv
PYTHON ?= python3
PIP := $(VENV)/bin/pip

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# constraints.txt pins the CPU build of torch: a bare `torch` would pull several GB of CUDA.
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# A new run directory each time: raysim never overwrites a run (it would ask for --resume).
demo: install
	$(VENV)/bin/raysim run configs/quickstart.yaml --out runs/quickstart-$$(date +%Y%m%d-%H%M%S)

test: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=25

clean:
	rm -rf $(VENV) runs .cache
