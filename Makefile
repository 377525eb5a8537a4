# diffusers-runtime: build, deploy and test on KServe / OpenShift AI.
# `make` (or `make help`) lists the targets. Every variable can be overridden on the command line
# (`make deploy MODEL_NAME=sdxl`) or from the environment.
#
# Template parameters (IMAGE, TAG, NAMESPACE, MODEL_NAME, STORAGE_URI, ...) and their defaults
# come from templates/params.env, the single source for `make render` and for envsubst by hand.

SHELL := /bin/bash
# --norc: bash reads /etc/bash.bashrc before -c when its stdin is a socket and SHLVL is unset (make started by a program
# over a socketpair, as Node's spawn does), and under -u Debian's bashrc fails on PS1.
.SHELLFLAGS := --norc -eu -o pipefail -c
.DEFAULT_GOAL := help

PARAMS_FILE ?= templates/params.env
PARAM_NAMES := $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' $(PARAMS_FILE))
$(foreach v,$(PARAM_NAMES),$(eval $(v) ?= $(shell sed -n 's/^$(v)=//p' $(PARAMS_FILE))))

# docker or podman, whichever is installed (podman first); override with CONTAINER_ENGINE=docker.
CONTAINER_ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null || echo docker)
# oc when present (OpenShift), else kubectl.
KUBECTL ?= $(shell command -v oc 2>/dev/null || command -v kubectl 2>/dev/null || echo oc)
PLATFORM ?= linux/amd64
DOCKERFILE ?= docker/Dockerfile
BUILD_ARGS ?=

# serverless | raw | multi: which InferenceService template `deploy` applies.
DEPLOY_MODE ?= serverless
RENDER_DIR ?= dist/manifests
# URL of the model endpoint for test-v1; empty = the InferenceService's status.url.
URL ?=
WARMUP_TIMEOUT ?= 2h
# Local run: empty = the embedded demo model (no setup); or a path / s3:// URI.
LOCAL_STORAGE_URI ?=
LOCAL_PORT ?= 8080
# A local server serves the runtime's default name, "model", as `npm start` does; MODEL_NAME=... on the command line
# (or in the environment) overrides it. templates/params.env's MODEL_NAME names the InferenceService instead.
MODEL_GIVEN := $(filter command line environment environment override,$(origin MODEL_NAME))
LOCAL_MODEL_NAME ?= $(if $(MODEL_GIVEN),$(MODEL_NAME),model)

ISVC_TEMPLATE_serverless := inference-service.yaml
ISVC_TEMPLATE_raw := inference-service-raw.yaml
ISVC_TEMPLATE_multi := inference-service-multi-model.yaml
ISVC_TEMPLATE = $(ISVC_TEMPLATE_$(DEPLOY_MODE))

TEMPLATES := $(wildcard templates/*.yaml)
# envsubst substitutes only these names: KServe's {{.Name}} and any other "$" pass through.
ENVSUBST_VARS := $(foreach v,$(PARAM_NAMES),$${$(v)})
# Each value reaches the manifests as typed, a password with $ ' " or \ included: $(value) keeps make from expanding a
# $ in it, sh_quote fits it inside '…' for the shell, and yaml_dq escapes it for the templates' double-quoted strings.
yaml_dq = $(subst ",\",$(subst \,\\,$(1)))
sh_quote = $(subst ','\'',$(1))
CHECKED_PARAMS := MODEL_NAME NAMESPACE IMAGE EXECUTION_PROVIDER CACHE_SIZE CPU_REQUEST CPU_LIMIT MEMORY_REQUEST MEMORY_LIMIT
PARAM_ENV = $(foreach v,$(PARAM_NAMES),$(v)='$(call sh_quote,$(call yaml_dq,$(value $(v))))')

.PHONY: help build push render deploy undeploy secret warmup test-v1 run-local test bench lint export

help: ## List the targets (this text)
	@echo "diffusers-runtime — make <target> [VAR=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@echo
	@echo "Variables (current value): IMAGE=$(IMAGE) TAG=$(TAG) NAMESPACE=$(NAMESPACE) MODEL_NAME=$(MODEL_NAME)"
	@echo "  STORAGE_URI=$(STORAGE_URI) DEPLOY_MODE=$(DEPLOY_MODE) (serverless|raw|multi)"
	@echo "  CONTAINER_ENGINE=$(CONTAINER_ENGINE) KUBECTL=$(KUBECTL) URL=$(URL)"
	@echo "  all template parameters and defaults: $(PARAMS_FILE)"

build: ## Build the runtime image IMAGE:TAG (docker or podman, auto-detected)
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) -f $(DOCKERFILE) -t $(IMAGE):$(TAG) $(BUILD_ARGS) .

push: ## Push IMAGE:TAG to its registry
	$(CONTAINER_ENGINE) push $(IMAGE):$(TAG)

render: ## Render templates/*.yaml with envsubst into RENDER_DIR (dist/manifests)
	@command -v envsubst >/dev/null || { echo "envsubst not found: install gettext (apt-get install gettext-base)" >&2; exit 1; }
	@# What the cluster or the pods would refuse is named here, not at `oc apply` or in a CrashLoopBackOff.
	@env $(foreach v,$(CHECKED_PARAMS),$(v)='$(call sh_quote,$(value $(v)))') bash scripts/check-params.sh
	@mkdir -p $(RENDER_DIR)
	@# The Secret's manifest holds the S3 keys as given: readable by its owner only.
	@for t in $(TEMPLATES); do \
	  out="$(RENDER_DIR)/$$(basename "$$t")"; rm -f "$$out"; \
	  case "$$t" in *s3-secret.yaml) (umask 077; env $(PARAM_ENV) envsubst '$(ENVSUBST_VARS)' < "$$t" > "$$out") ;; \
	  *) env $(PARAM_ENV) envsubst '$(ENVSUBST_VARS)' < "$$t" > "$$out" ;; esac; \
	done
	@echo "rendered $(words $(TEMPLATES)) templates into $(RENDER_DIR)/ (namespace $(NAMESPACE), model $(MODEL_NAME))"

secret: render ## Create/update the S3 data-connection Secret from S3_* variables
	@if [ $(words $(filter CHANGE_ME,$(value S3_ACCESS_KEY_ID) $(value S3_SECRET_ACCESS_KEY))) != 0 ]; then \
	  echo "set S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_ENDPOINT_URL, S3_REGION, S3_BUCKET first (or create the data connection in the OpenShift AI dashboard)" >&2; exit 1; fi
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/s3-secret.yaml

deploy: render ## Apply PVC, ServingRuntime and the InferenceService (DEPLOY_MODE=serverless|raw|multi)
	@test -n "$(ISVC_TEMPLATE)" || { echo "DEPLOY_MODE must be serverless, raw or multi (got '$(DEPLOY_MODE)')" >&2; exit 1; }
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/pvc.yaml
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/serving-runtime.yaml
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/$(ISVC_TEMPLATE)
	@if [ "$(DEPLOY_MODE)" = raw ]; then $(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/route.yaml; fi
	@if [ "$(DEPLOY_MODE)" = multi ]; then \
	  echo "watch them: $(KUBECTL) get isvc -n $(NAMESPACE) -w   (one InferenceService per model in templates/$(ISVC_TEMPLATE))"; \
	else echo "watch it: $(KUBECTL) get isvc -n $(NAMESPACE) -w   (state: $(KUBECTL) get isvc $(MODEL_NAME) -n $(NAMESPACE) -o jsonpath='{.status.url}')"; fi

undeploy: render ## Delete the InferenceService(s), Route, warm-up Job and ServingRuntime (keeps PVC and Secret)
	-$(KUBECTL) delete -n $(NAMESPACE) --ignore-not-found -f $(RENDER_DIR)/$(ISVC_TEMPLATE)
	-$(KUBECTL) delete -n $(NAMESPACE) --ignore-not-found -f $(RENDER_DIR)/route.yaml
	-$(KUBECTL) delete -n $(NAMESPACE) --ignore-not-found -f $(RENDER_DIR)/warmup-job.yaml
	-$(KUBECTL) delete -n $(NAMESPACE) --ignore-not-found -f $(RENDER_DIR)/serving-runtime.yaml
	@echo "kept: PVC $(PVC_NAME) (the cache) and Secret $(S3_SECRET_NAME); delete them by hand if wanted"

warmup: render ## Fill the PVC cache from S3 with the warm-up Job and wait for it
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/pvc.yaml
	$(KUBECTL) delete -n $(NAMESPACE) --ignore-not-found -f $(RENDER_DIR)/warmup-job.yaml
	$(KUBECTL) apply -n $(NAMESPACE) -f $(RENDER_DIR)/warmup-job.yaml
	@echo "waiting up to $(WARMUP_TIMEOUT) for job/$(MODEL_NAME)-cache-warmup ..."
	@# Complete or Failed, whichever comes first: waiting for Complete alone would sit out WARMUP_TIMEOUT on a failed Job.
	@job=job/$(MODEL_NAME)-cache-warmup; \
	$(KUBECTL) wait -n $(NAMESPACE) --for=condition=complete --timeout=$(WARMUP_TIMEOUT) $$job & done_pid=$$!; \
	$(KUBECTL) wait -n $(NAMESPACE) --for=condition=failed --timeout=$(WARMUP_TIMEOUT) $$job >/dev/null 2>&1 & failed_pid=$$!; \
	while kill -0 $$done_pid 2>/dev/null && kill -0 $$failed_pid 2>/dev/null; do sleep 1; done; \
	if kill -0 $$done_pid 2>/dev/null && wait $$failed_pid; then kill $$done_pid; ok=failed; \
	else kill $$failed_pid 2>/dev/null; wait $$done_pid && ok=done || ok=; fi; \
	if [ "$$ok" = done ]; then \
	  $(KUBECTL) logs -n $(NAMESPACE) $$job --tail=20; \
	else \
	  [ "$$ok" != failed ] || echo "$$job failed (a configuration error at once, else after backoffLimit retries):" >&2; \
	  $(KUBECTL) logs -n $(NAMESPACE) $$job --tail=50 || true; exit 1; \
	fi

test-v1: ## POST scripts/v1_input.json to URL (default: the isvc URL) and check the PNG
	@url='$(URL)'; model='$(if $(MODEL_GIVEN),$(MODEL_NAME),)'; \
	if [ -z "$$url" ]; then \
	  url=$$($(KUBECTL) get isvc $(MODEL_NAME) -n $(NAMESPACE) -o jsonpath='{.status.url}' 2>/dev/null || true); \
	  model='$(MODEL_NAME)'; \
	  if [ -z "$$url" ]; then echo "no URL: pass URL=http://host:port (e.g. a local server: make test-v1 URL=http://localhost:$(LOCAL_PORT)) or deploy InferenceService $(MODEL_NAME) in $(NAMESPACE)" >&2; exit 2; fi; \
	fi; \
	scripts/test-v1.sh "$$url" $$model

run-local: ## Run the server here (npm ci/build if needed); demo model unless LOCAL_STORAGE_URI; serves "model"
	@[ -d node_modules ] || npm ci
	@[ -f dist/src/main.js ] || npm run build
	PORT=$(LOCAL_PORT) MODEL_NAME=$(LOCAL_MODEL_NAME) $(if $(LOCAL_STORAGE_URI),STORAGE_URI='$(LOCAL_STORAGE_URI)') npm start

test: ## Run the test suite (npm test)
	npm test

bench: ## Run the benchmarks: S3 fetch, cold start, serving
	npm run bench:s3 && npm run bench:cold-start && npm run bench:serve

lint: ## shellcheck the scripts, hadolint the Dockerfile (each when installed)
	@if command -v shellcheck >/dev/null; then shellcheck --severity=warning scripts/*.sh && echo "shellcheck: ok"; else echo "shellcheck not installed, skipped"; fi
	@if command -v hadolint >/dev/null; then hadolint $(DOCKERFILE) && echo "hadolint: ok"; else echo "hadolint not installed, skipped"; fi

export: ## Export a Hugging Face model to ONNX: make export HF_MODEL=... OUT=... [EXPORT_ARGS=--plain]
	@test -n "$(HF_MODEL)" -a -n "$(OUT)" || { echo "usage: make export HF_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 OUT=./sd15-onnx [EXPORT_ARGS='--push s3://bucket/prefix'] (fused float16 for CUDA; --plain for the CPU)" >&2; exit 2; }
	scripts/export-onnx.sh "$(HF_MODEL)" "$(OUT)" $(EXPORT_ARGS)
