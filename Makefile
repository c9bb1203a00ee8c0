# The two commands of the README: `make demo` (the main job on the bundled model) and `make test`.
# Each creates or refreshes the virtualenv .venv and installs everything from the registries.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
BIN    := $(VENV)/bin

.PHONY: demo test venv clean chromium

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on local disk, never the CUDA one.
	$(BIN)/python -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp (~15 min on 2 cores the first time; pip's wheel cache makes it instant after).
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -e '.[test,ray]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/quantkit demo

# The HTML report is tested as a person sees it, in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
