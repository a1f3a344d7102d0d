# kv-cache: `make serve` runs the service, `make test` sets up and runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: fuzz native sanitize serve test lint typecheck unit bench proto proto-check manifests manifests-check image clean

NATIVE_SOURCES := $(wildcard native/*.cpp native/*.hpp)
NATIVE := $(VENV)/.native

$(STAMP): pyproject.toml setup.py
	scripts/native_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The native data plane, rebuilt in place whenever native/ changes (the install builds it too).
$(NATIVE): $(STAMP) $(NATIVE_SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(NATIVE)

native: $(NATIVE)

# The native tests again, against a build with AddressSanitizer and UBSan.
SANITIZE_DIR := build/sanitize
sanitize: $(STAMP)
	KV_CACHE_SANITIZE=1 $(BIN)/python setup.py -q build_ext --build-lib $(SANITIZE_DIR) \
		--build-temp $(SANITIZE_DIR)/objects
	KV_CACHE_NATIVE=$$(ls $(SANITIZE_DIR)/service/_dataplane*.so) \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	$(BIN)/python -m pytest -p tests.support.sanitized_native tests/unit/native \
		tests/conformance/test_native.py tests/unit/dataplane/test_planes_agree.py

# The native event decoder under libFuzzer (clang, ASan, UBSan); what it keeps is then held
# to the Python decoder. CI runs it for a minute.
FUZZ_SECONDS ?= 600
fuzz: $(NATIVE)
	scripts/fuzz_decode.sh $(FUZZ_SECONDS)

serve: $(NATIVE)
	$(BIN)/kv-cache serve

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(NATIVE)
	$(BIN)/mypy

unit: $(NATIVE)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench_decode
	$(BIN)/python -m loadtest.bench_keys
	$(BIN)/python -m loadtest.bench_index
	$(BIN)/python -m loadtest.bench_ingest --memory
	$(BIN)/python -m loadtest.bench_service
	$(BIN)/python -m loadtest.bench_grpc_floor
	$(BIN)/python -m loadtest.sim --quick
	$(BIN)/python -m loadtest.bench_prompts

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

manifests: $(STAMP)
	$(BIN)/python scripts/render_manifests.py

manifests-check: $(STAMP)
	$(BIN)/python scripts/render_manifests.py --check

IMAGE ?= kv-cache:dev
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
