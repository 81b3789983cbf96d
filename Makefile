# Set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
# Where torch is missing, install this build first: on the project's machines
# it is the CPU build on local disk. GPU users install their CUDA torch before.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test]"

# Train a hypernetwork on the shipped tiny model with shapes in a style it never saw (every hue drawn
# as the next around the colour wheel), then draw without and with it: a contact sheet, the PNGs, and
# the style measured.
demo: install
	nai-fast train --preset tiny --output-dir nai-fast-output --max-steps 600 --batch-size 8 --lr 3e-3 --caption-dropout 0.2 \
		--activation relu --penalty-weight 0 --cache-latents --overwrite
	nai-fast demo --output-dir nai-fast-images

# The tests, a worker a core (a test file to a worker: its module fixtures run once), then
# every benchmark once on small sizes so the suites never rot. The slowest are listed, to keep
# the whole well under 15 minutes on 2 cores.
test: install
	$(PYTHON) -m pytest tests -n auto --dist loadfile --durations=15
	$(PYTHON) -m pytest benchmarks --benchmark-disable --durations=5

# Full-size benchmarks, nai_fast and its baselines side by side.
bench: install
	$(PYTHON) -m pytest benchmarks
