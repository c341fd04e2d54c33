# The two commands of the quick start, and a few more. Each installs what it needs
# into .venv/ in this checkout (torch 2.13.0 CPU build pinned for dev and tests only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-pull bench-fleet bench-march bench-transfer bench-real bench-scale bench-selfseed clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: seed warm-up → local-folder store → fresh node pull; prints the pull's wall time and
## the first call cold / on the node / local-warm
demo: $(STAMP)
	$(BIN)/python bench/first_call.py --formats config --repeat 1

## test: lint, then the whole suite (real S3/GCS servers on 127.0.0.1, real compiles) on
## TEST_WORKERS xdist workers, each test file on one worker (tests/conftest.py sends the
## files that compile most first); TEST_WORKERS=0 runs it in this process. Then the tests
## marked `timed` (a deadline held, interpreter start included), none of which compiles
## (tests/conftest.py refuses one that does), on TIMED_WORKERS workers, test by test:
## they mostly wait, so 3 took 69-74 s where 2 took 91 s (4: 58-64 s, less margin);
## TIMED_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
TIMED_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/ruff check agent tests bench examples
	$(BIN)/ruff format --check agent tests bench examples
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not timed"
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=5 \
		-n $(TIMED_WORKERS) --dist load -m timed

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench examples
	$(BIN)/ruff format --check agent tests bench examples

## bench: first-call seconds per format (3 fresh nodes each), zstd vs gzip, where a
## pull's time goes, a fleet pulling at once, the cost of a pinned -march, a
## transformers Llama on fresh nodes, and a 128 MiB Triton-shaped cache pulled beside
## tar and cp (bench-scale --quick), and the app's start under run --publish
bench: $(STAMP)
	$(BIN)/python bench/first_call.py --repeat 3
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/pull.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/march.py
	$(BIN)/python bench/real_model.py
	$(BIN)/python bench/scale.py --quick
	$(BIN)/python bench/selfseed.py

## bench-pull: the pull's wall split (process start, fingerprint, resolve, fetch,
## install, rest) over 10 fresh pulls, and time to first result against cold
bench-pull: $(STAMP)
	$(BIN)/python bench/pull.py

## bench-fleet: 48 pulls at once against SeaweedFS on loopback: pulls/s, p50/p99, requests
bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet.py

## bench-march: steady-state ms/iter of the example transformer, -march=native vs x86-64-v3
bench-march: $(STAMP)
	$(BIN)/python bench/march.py

## bench-real: a transformers Llama (generate; a logits forward) cold / node / local-warm /
## precompile node: seconds until warm and until the first token
bench-real: $(STAMP)
	$(BIN)/python bench/real_model.py

## bench-scale: GB-scale caches (1 GiB / 12,000 files, 4 GiB / 50,000 files, Triton-shaped)
## pulled from a local folder and SeaweedFS, beside `s5cmd cp` + `tar -I zstd -x` + sync and
## `cp -r` + sync: medians of 3 rounds, peak RSS, against issue #18's goals; trees and
## stores kept in /var/tmp/torchwarm-scale between runs (about 11 GiB)
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py

## bench-selfseed: the app's start and run's end with `run --publish` against plain `run`
bench-selfseed: $(STAMP)
	$(BIN)/python bench/selfseed.py

bench-transfer: $(STAMP)
	$(BIN)/python bench/transfer.py

clean:
	rm -rf $(VENV) .torchwarm
