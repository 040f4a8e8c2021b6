# Every target builds its own virtual environment first; nothing is needed beyond python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= output/demo

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --output $(DEMO_DIR)
	$(PY) tools/visualize_saliency.py $(DEMO_DIR)/data/detection/JPEGImages --limit 6 --output $(DEMO_DIR)/saliency.png

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_mix.py

clean:
	rm -rf $(VENV) output .pytest_cache
