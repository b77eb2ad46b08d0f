# make demo: set up and run `normkit check` (parity of every op and backend against torch.nn).
# make test: set up and run the whole test suite (Triton kernels through its CPU interpreter).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.normkit-installed
DEMO_STAMP := $(VENV)/.normkit-demo-installed

.PHONY: demo test setup check bench bench-syncbn bench-cpu clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[triton,cli,dev]"
	# timm for the surgery tests on real timm models; --no-deps: its torchvision pin would pull a CUDA torch
	$(PY) -m pip install -q --no-deps "timm==1.0.31"
	touch $(STAMP)

setup: $(STAMP)

# The demo needs normkit and torch only (no Triton, no dev tools: a CPU check).
$(DEMO_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/normkit check

check: demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --dist worksteal

bench: $(STAMP)
	$(PY) benchmarks/bench_norms.py

# The CPU kernels (numba) against torch eager, torch.compile and "auto", 1 and 2 threads, at the
# issue-12 shapes: benchmarks/results/cpu.{md,json,png} (about 10 minutes on two cores).
bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

# Host time per call of the Triton path on the CPU with every kernel launch mocked (issue 15 item 9),
# three dispatch routes against torch eager: benchmarks/results/triton_host_cpu.{md,json} (a few minutes).
.PHONY: bench-triton-host
bench-triton-host: $(STAMP)
	TRITON_INTERPRET=1 $(PY) benchmarks/bench_triton_host.py --out benchmarks/results

# SyncBatchNorm on gloo: 1, 2 and 4 CPU ranks on 127.0.0.1, step time and bytes per collective.
bench-syncbn: $(STAMP)
	$(PY) benchmarks/bench_syncbn.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis

# make pictures: redraw docs/explain.png and docs/compare.png (compare trains for a few minutes).
.PHONY: pictures
pictures: $(STAMP)
	$(VENV)/bin/normkit explain --png docs/explain.png
	$(VENV)/bin/normkit compare --png docs/compare.png

# make support-matrix: regenerate the README's table of what each backend runs (normkit.support_matrix(),
# between its marker lines); tests/test_support.py fails until it is rerun after a backend changes.
.PHONY: support-matrix
support-matrix: $(STAMP)
	$(PY) -c "import normkit.support as s; print('README.md', 'updated' if s.update_readme('README.md') else 'unchanged')"

# The norms of today's blocks (issue 13) against the code users write, eager and torch.compile:
# benchmarks/results/blocks_<device>.{md,json} (CPU: about 5-10 minutes on two cores).
.PHONY: bench-blocks
bench-blocks: $(STAMP)
	$(PY) benchmarks/bench_blocks.py

# make gpu-check: on a CUDA machine, with that machine's own torch and Triton (no venv): the
# Triton tests natively (no interpreter), then the GPU benchmark engine (device, versions,
# commit and tables under benchmarks/results/, copied to $$OUT when the device tool sets it).
GPU_PY ?= python3
.PHONY: gpu-check
# SIGINT, not SIGTERM: a test run cut by its budget still prints its summary. The block norms' tests
# first (the newest kernels), then the rest, then one sample past 2**31 elements with Triton's
# overflow checks compiled in (TRITON_DEBUG=1: GroupNorm channels_last and BatchNorm NCHW, about
# 25 GB); each step runs whatever the one before did (7.8 minutes of budgets in all).
gpu-check:
	-PYTHONPATH=src timeout -s INT 140 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "triton" \
		tests/test_blocks_modulated.py tests/test_blocks_gated.py tests/test_blocks_qk_sandwich.py \
		tests/test_blocks_norm_free.py tests/test_blocks_outside.py tests/test_triton_split.py
	-PYTHONPATH=src timeout -s INT 130 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "triton" \
		tests/test_triton_kernels.py tests/test_triton_batch_norm.py tests/test_triton_batch_norm_unaligned.py \
		tests/test_triton_edges.py tests/test_triton_layouts.py tests/test_parity.py tests/test_transforms.py tests/test_support.py
	-TRITON_DEBUG=1 PYTHONPATH=src timeout -s INT 70 $(GPU_PY) -m pytest -q -p no:cacheprovider \
		tests/test_triton_large.py
	-PYTHONPATH=src timeout 75 $(GPU_PY) benchmarks/bench_norms.py --out benchmarks/results
	-PYTHONPATH=src timeout 55 $(GPU_PY) benchmarks/bench_blocks.py --dtypes bf16 --budget 0.02 --compile-budget 30 \
		--providers torch torch.compile normkit-triton --out benchmarks/results
	if [ -n "$$OUT" ]; then cp benchmarks/results/* "$$OUT"/ 2>/dev/null || true; fi

# make kernel-report: compile every Triton kernel variant the launchers choose at the reference
# shapes for sm_90 (no GPU needed) and write benchmarks/results/sm90_static.{json,md}: registers,
# spills, load widths, programs per SM and launches per training step (issue 15).
.PHONY: kernel-report
kernel-report: $(STAMP)
	$(PY) benchmarks/kernel_report.py --out benchmarks/results
