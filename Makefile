# Two commands matter: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/gateway.yaml

.PHONY: run test lint bench soak fuzz system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0  # first: the CPU build, not the CUDA one
	$(BIN)/pip install --quiet -e '.[dev,models]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gateway run -c $(CONFIG)

# Debian packages the integration tests talk to (real peers, no mocks).
# dcmtk: storescu/storescp/echoscu/dsrdump; orthanc: the PACS that delivery tests send to;
# dicom3tools: dciodvfy, the validator every generated SR and SEG must pass.
# postgresql: initdb/pg_ctl for the server tests/pg.py starts (Debian puts them off PATH).
# faketime: libfaketime, to step the wall clock under a gateway (tests/integration/test_clock.py).
# podman, runc, debootstrap: tests/deploy/test_image.py builds the image on a Debian base made
# here and runs it; systemd-analyze verifies deploy/systemd; kubectl renders deploy/kubernetes
# (Debian 12's kubernetes-client is 1.20, whose kustomize is too old: the tests say so).
# chromium: the headless browser the dashboard's test drives with Playwright (no browser
# download: tests/integration/test_dashboard_browser.py launches /usr/bin/chromium).
system-deps:
	@command -v storescu >/dev/null && command -v echoscu >/dev/null && command -v Orthanc >/dev/null \
	  && command -v dciodvfy >/dev/null \
	  || { echo "installing dcmtk, orthanc and dicom3tools (apt-get)"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends dcmtk orthanc dicom3tools >/dev/null; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || { echo "installing postgresql (apt-get): the PostgreSQL queue tests' throwaway server"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 \
	  || { echo "installing faketime (apt-get): libfaketime, for the clock-step drills"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends faketime >/dev/null; }
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	  && command -v systemd-analyze >/dev/null \
	  || { echo "installing podman, runc, debootstrap, systemd (apt-get): tests/deploy builds and runs the image"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends podman runc debootstrap uidmap systemd >/dev/null; }
	@command -v kubectl >/dev/null \
	  || { echo "installing kubernetes-client (apt-get): kubectl kustomize renders deploy/kubernetes"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null; }
	@test -x /usr/bin/chromium \
	  || { echo "installing chromium (apt-get): the dashboard's browser test"; \
	       (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: $(STAMP) system-deps
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q  # tests/deploy: hadolint, kustomize + schemas, compose, systemd, the image

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench || true
	$(BIN)/mypy
	$(BIN)/lint-imports  # the import layers (docs/architecture.md); also run by make test

# Coverage-guided fuzzing (tests/fuzz/, docs/reliability.md): each target under atheris for
# FUZZ_SECONDS, one at a time; figures printed, new reproducers in tests/fuzz/crashes/.
# Not part of `make test`, which replays the corpus.  E.g. make fuzz FUZZ_SECONDS=60 FUZZ_TARGETS=mllp
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=
fuzz: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install --quiet -e '.[fuzz]'
	$(BIN)/python -m tests.fuzz run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

bench: $(STAMP) system-deps
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.hl7
	$(BIN)/python -m bench.forward
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.tls
	$(BIN)/python -m bench.tls --protocol hl7
	$(BIN)/python -m bench.hl7 --engine postgresql
	$(BIN)/python -m bench.scaleout
	$(BIN)/python -m bench.workers

# About 20 minutes plus the drain (docs/reliability.md, "Soak"); not part of `make test`.
# matplotlib (the plot) comes from the `soak` extra, installed on first use.
soak: $(STAMP)
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install --quiet -e '.[soak]'
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
