# The kit's two commands are `make demo` and `make test` (see README.md); the rest are their steps.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
RT_VENV := .venv-runtime
# The runtime's tests again on the stack of Cambricon's image: its torch (2.1; PyPI has only the CUDA
# build, some 2.5 GB with its libraries, which runs on the CPU too) and what the runtime role's
# wheelhouse installs for it (transformers 4.55, NumPy 1). DeepSpeed is the image's own there: not tested.
COMPAT_VENV := .venv-runtime-torch21
# Every venv installs from its hashed lock (locks/lock.py: `make lock` remakes them): the packages of the lock
# with their hashes checked and no resolution of its own, then the kit's own project, then pip's check.
PIP_LOCKED := pip install -q --require-hashes --no-deps -r
# $(call pip_locked,VENV,LOCK [ARGS]): that install, tried a second time if the first fails (a download of
# the locks' GBs cut off by the network; pip's cache keeps what had arrived). A real error fails both.
pip_locked = $(1)/bin/$(PIP_LOCKED) $(2) || { echo "pip install -r $(firstword $(2)) failed; trying once more" >&2; \
	$(1)/bin/$(PIP_LOCKED) $(2); }
# Where the torch 2.13 lock's CPU build of torch comes from: the wheel on disk (the kit's machines), else
# PyTorch's CPU index (its hash is the lock's either way).
TORCH_CPU := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
FIXTURES := $(CURDIR)/.cache/fixtures
# Molecule scenarios run by `make test`, in order.
SCENARIOS ?= default preflight_driver_failures image_weights_failures jobs service_replicas multinode
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CLA2_FIXTURES := $(FIXTURES)
# pip that builds the runtime's wheelhouse and the stand-in image's wheels on the controller
export CLA2_HOST_PIP := $(CURDIR)/$(VENV)/bin/python -m pip

export ANSIBLE_FORCE_COLOR := 0

.PHONY: demo bench-demo test lock venv runtime-venv compat-venv sandbox-image fixtures lint test-units test-runtime \
        test-runtime-compat test-molecule bench-smoke \
        sandbox sandbox-destroy clean

venv: $(VENV)/.done
$(VENV)/.done: locks/controller.txt
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(call pip_locked,$(VENV),locks/controller.txt)
	$(VENV)/bin/pip check
	touch $@

runtime-venv: $(RT_VENV)/.done
$(RT_VENV)/.done: locks/runtime-torch2.13.txt runtime/pyproject.toml
	rm -rf $(RT_VENV) && $(PYTHON) -m venv $(RT_VENV)
	$(call pip_locked,$(RT_VENV),locks/runtime-torch2.13.txt $(TORCH_CPU))
	$(RT_VENV)/bin/pip install -q --no-deps --no-build-isolation -e runtime
	$(RT_VENV)/bin/pip check
	touch $@

compat-venv: $(COMPAT_VENV)/.done
$(COMPAT_VENV)/.done: locks/runtime-torch2.1.txt runtime/pyproject.toml
	rm -rf $(COMPAT_VENV) && $(PYTHON) -m venv $(COMPAT_VENV)
	$(call pip_locked,$(COMPAT_VENV),locks/runtime-torch2.1.txt)
	$(COMPAT_VENV)/bin/pip install -q --no-deps --no-build-isolation -e runtime
	$(COMPAT_VENV)/bin/pip check
	touch $@

# Remake every lock whose declared inputs changed (requirements.txt, runtime/pyproject.toml,
# roles/cla2_runtime/files/locks/stacks.yml), keeping the versions that still fit; UPGRADE=1 takes the newest.
# Version changes are listed in CHANGELOG.md.
lock: venv
	$(VENV)/bin/python locks/lock.py --uv $(VENV)/bin/uv $(if $(UPGRADE),--upgrade)

sandbox-image:
	sandbox/build-image.sh

# Local stand-ins for the vendor's artifacts (driver package, PyTorch image tarball, weights).
fixtures: venv sandbox-image runtime-venv
	sandbox/fixtures/build.sh $(FIXTURES)

lint: venv runtime-venv
	$(VENV)/bin/python locks/lock.py --check
	yamllint --strict .
	ansible-lint
	$(RT_VENV)/bin/ruff check runtime bench tests locks

# The roles' own modules, run as Ansible runs them (tests/unit).
test-units: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

test-runtime: runtime-venv
	cd runtime && ../$(RT_VENV)/bin/pytest -q -p no:cacheprovider

test-runtime-compat: compat-venv
	cd runtime && ../$(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider -k 'not deepspeed and not torchrun'

test-molecule: venv fixtures
	for s in $(SCENARIOS); do echo "== molecule scenario $$s"; molecule test -s $$s; done

bench-smoke: venv runtime-venv
	bench/smoke.sh

test: lint test-units test-runtime test-runtime-compat test-molecule bench-smoke

sandbox: venv fixtures
	ansible-playbook playbooks/sandbox.yml

sandbox-destroy: venv
	ansible-playbook playbooks/sandbox.yml -e sandbox_state=absent

# Sandbox host, site.yml, the seed's whole workflow on a tiny model (run name `demo`: a re-run finds
# every stage done and changes nothing), then the web chat and the API stay up.
demo: sandbox
	ansible-playbook site.yml -l mlu-hosts
	ansible-playbook playbooks/pipeline.yml -l mlu-hosts -e cla2_demo=true -e cla2_run=demo
	@ip=$$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' cla2-sandbox-1); \
	 echo; echo "Demo ready. Reports: reports/cla2-sandbox-1/demo/ (comparison.md compares C-Eval across stages)"; \
	 echo "  web chat: http://$$ip:19327/chat/   (password: the API key)"; \
	 echo "  API:      http://$$ip:19327/v1      (API key: cla2-demo-key)"; \
	 echo "  try:      curl -s http://$$ip:19327/v1/chat/completions -H 'Authorization: Bearer cla2-demo-key' \\"; \
	 echo "              -H 'Content-Type: application/json' -d '{\"model\": \"merged-pt\", \"messages\": [{\"role\": \"user\", \"content\": \"你好\"}]}'"

# Time of each stage of the demo, the re-run, and the kit's job overhead (docs/benchmarks.md).
bench-demo: venv
	bench/demo_stages.py --skip-provision

clean: sandbox-destroy
	rm -rf $(VENV) $(RT_VENV) $(COMPAT_VENV) .cache
