# The two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
STAMP := $(VENV)/.installed
# pytest processes side by side. A job test waits on Ray starting and stopping more than it
# computes (a toy training job keeps 1.3 of 2 cores busy), so two processes on two cores cut the
# suite from ~19 to 11-16 min here (docs/benchmarks.md); each job test starts its own Ray, so more
# wants more memory.
TEST_PROCESSES ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

.PHONY: install demo test clean-demo

install: $(STAMP)

# DeepSpeed builds from source; DS_BUILD_OPS=0 skips compiling CUDA ops at install time.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	rm -rf $(RUN_DIR)
	$(BIN)/python jobs/prepare_data.py --config configs/demo/prepare.yaml run_dir=$(RUN_DIR)
	$(BIN)/python jobs/train_clipreid.py --config configs/demo/train.yaml run_dir=$(RUN_DIR)
	$(BIN)/python jobs/build_index.py run_dir=$(RUN_DIR) model_dir=$(RUN_DIR)/models/untrained
	$(BIN)/python jobs/build_index.py run_dir=$(RUN_DIR) model_dir=$(RUN_DIR)/models/trained
	$(BIN)/python jobs/evaluate.py run_dir=$(RUN_DIR) model_dir=$(RUN_DIR)/models/untrained label=untrained
	$(BIN)/python jobs/evaluate.py run_dir=$(RUN_DIR) model_dir=$(RUN_DIR)/models/trained label=trained

# Then the evaluation tests again under a second OpenBLAS core type (issue 12: ranks hinge on the
# last bit of a distance, and kernels round differently); .ci/second_blas_kernel.py picks it.
test: install
	$(PYTEST)
	@kernel=$$($(BIN)/python .ci/second_blas_kernel.py); \
	if [ -n "$$kernel" ]; then \
		echo "evaluation tests again with OPENBLAS_CORETYPE=$$kernel"; \
		OPENBLAS_CORETYPE=$$kernel $(PYTEST) tests/test_eval_*.py; \
	else echo "numpy does not use OpenBLAS on x86-64 here: no second BLAS pass"; fi

clean-demo:
	rm -rf $(RUN_DIR)
