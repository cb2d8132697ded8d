# One entry point for every check; CI runs `make test` as it is.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU build this machine keeps on disk, so that the project's
# own range (torch>=2.4) installs nothing more and no multi-GB CUDA build is downloaded.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test lint format bench demo serve publish-demo compose-config clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark table in the README, one after the other (about 40 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/transfer.py --size-mib 1024 --runs 5 --s3
	$(BIN)/python bench/server.py
	$(BIN)/python bench/serving.py

# The whole loop in a scratch repository: store, serve, predict, store v2, reload, roll back.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# The model server and the proxy on localhost, kept running (Ctrl-C stops both).
# SERVE_PORT / SERVER_PORT pick the ports (8080 / 8000).
serve: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/serve.sh

# Store the demo model in the compose stack's MinIO and record it in .nexus_meta.json.
publish-demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/publish_demo.sh

# Compose v2's own validation of docker-compose.yml, offline (no Docker engine needed).
compose-config: $(STAMP)
	"$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')" -f docker-compose.yml config -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
