# Two commands on a fresh machine:  make train   (main job)   and   make test   (the tests).
PYTHON ?= python3

.PHONY: install train test test-fast bench device-check

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

train: install
	$(PYTHON) -m pipenag train --out runs/main

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) -m pipenag bench optimizer

device-check: install
	$(PYTHON) experiments/device_check.py
