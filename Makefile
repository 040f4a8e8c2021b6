# Every target builds its own virtual environment first; nothing is needed beyond python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR := output/demo
# `make demo SEED=1`: the same demo with another training seed (same data), into output/demo_seed1.
SEED ?= 0
ifneq ($(SEED),0)
SEED_OPTS := OUTPUT_DIR $(DEMO_DIR)_seed$(SEED) PRETRAIN.OPTS "['SEED', '$(SEED)']" DETECT.SEEDS "[$(SEED)]"
endif

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The built-in data, then the demo study (configs/study/demo.yaml); it ends by printing its report.
demo: $(STAMP)
	test -f $(DEMO_DIR)/data/manifest.json || $(PY) tools/make_demo_data.py --output $(DEMO_DIR)/data
	$(PY) tools/visualize_saliency.py $(DEMO_DIR)/data/detection/JPEGImages --limit 6 --output $(DEMO_DIR)/saliency.png
	$(PY) tools/study.py --config-file configs/study/demo.yaml $(SEED_OPTS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_mix.py

clean:
	rm -rf $(VENV) output .pytest_cache
