# Every target installs what it needs into .venv first; nothing outside the repo is touched.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 30080
WORKERS ?=
PYTEST_FLAGS ?= -q
# pytest-asyncio asks for the loop scope of async fixtures to be stated: one loop per test.
PYTEST := $(PY) -m pytest -o asyncio_default_fixture_loop_scope=function

.PHONY: install run test demo bench bench-deps soak clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

run: install  ## start the router; workers from WORKERS="http://gpu1:10090 http://gpu2:10090"
	$(PY) diffusion_router.py --host $(HOST) --port $(PORT) $(if $(strip $(WORKERS)),--worker-urls $(WORKERS))

test: install  ## run the test suite
	$(PYTEST) $(PYTEST_FLAGS) test_diffusion_router.py

demo: install  ## stand-in workers, the router, the README's example requests; stops all it started
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ examples/__pycache__

# Benchmark: router vs direct vs nginx (least_conn); see bench/README.md.
BENCH_FLAGS ?=
BENCH_SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

bench-deps:  ## install nginx with apt (root, or sudo) so `make bench` can compare the router with it
	$(BENCH_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update
	$(BENCH_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx

bench: install  ## bounded benchmark on 127.0.0.1 (~3 min); table on stdout and in bench/results/latest.md
	$(PY) bench/bench.py $(BENCH_FLAGS)

soak: install  ## the long stress run: 50k requests, 1000 concurrent, vanishing clients, killed workers (<= 10 min)
	STRESS_REQUESTS=50000 STRESS_CONCURRENCY=1000 STRESS_SECONDS=600 \
		$(PYTEST) -q -p no:cacheprovider test_diffusion_router.py -k stress
