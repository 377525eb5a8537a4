#!/usr/bin/env bash
# Checks the template parameters `make render` is about to write into the manifests, so that a value the cluster
# would refuse (or a pod would crash on) is named here rather than at `oc apply` or in a CrashLoopBackOff.
# Reads the parameters from the environment (the Makefile passes each as typed). Exit 2 with every problem on
# stderr (one line each); warnings do not stop the render.
set -u

problems=0
fail() { echo "$1" >&2; problems=$((problems + 1)); }
warn() { echo "warning: $1" >&2; }

# KServe's webhook refuses an InferenceService name outside [a-z]([-a-z0-9]*[a-z0-9])?, and the warm-up Job's name
# (MODEL_NAME-cache-warmup) becomes a label value, at most 63 characters.
name=${MODEL_NAME-}
case "$name" in
  '' | [!abcdefghijklmnopqrstuvwxyz]* | *[!abcdefghijklmnopqrstuvwxyz0123456789-]* | *-)
    fail "MODEL_NAME='$name' cannot name an InferenceService: lower-case letters, digits and '-', starting with a letter and not ending with '-' (e.g. sd-15, not sd-1.5 or SD15)" ;;
esac
[ ${#name} -le 50 ] || fail "MODEL_NAME='$name' is ${#name} characters: at most 50, as the warm-up Job is named MODEL_NAME-cache-warmup and a Kubernetes label value holds 63"
ns=${NAMESPACE-}
[ $((${#name} + ${#ns})) -le 52 ] || warn "MODEL_NAME and NAMESPACE are $((${#name} + ${#ns})) characters together, over 52: on OpenShift the hosts <name>-predictor-<namespace> (Serverless) and <name>-<namespace> (route.yaml) must fit one 63-character DNS label; shorten one or give the Route a host"

# The manifests name the image IMAGE:TAG: a tag or digest inside IMAGE would make an invalid reference.
image=${IMAGE-}
base=${image##*/}
case "$base" in
  *@* | *:*) fail "IMAGE='$image' holds a tag or digest, and the manifests add :TAG to it: give the repository alone (IMAGE=${image%"$base"}${base%%[:@]*}) and the rest as TAG (a digest: TAG=0.1.0@sha256:...)" ;;
esac

# The runtime reads EXECUTION_PROVIDER as it does (trimmed, any case); anything else would exit 2 in every pod.
provider=$(printf '%s' "${EXECUTION_PROVIDER-}" | tr -d ' \t' | tr '[:upper:]' '[:lower:]')
case "$provider" in
  '' | auto | cuda | cpu) ;;
  *) fail "EXECUTION_PROVIDER='${EXECUTION_PROVIDER-}' must be auto, cuda or cpu: the runtime would refuse it and every pod would exit at start" ;;
esac

# Kubernetes quantities (apimachinery's grammar), in base units: the number is scaled by its suffix. Prints nothing
# for a value that is not a quantity.
to_base() {
  local v=$1 num suffix
  [[ $v =~ ^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$ ]] || return 0
  num=${BASH_REMATCH[1]}
  suffix=${BASH_REMATCH[5]}
  awk -v n="$num" -v s="$suffix" 'BEGIN {
    split("Ki Mi Gi Ti Pi Ei", b, " "); split("k M G T P E", d, " ")
    f = 1
    for (i = 1; i <= 6; i++) { if (s == b[i]) f = 1024 ^ i; if (s == d[i]) f = 1000 ^ i }
    if (s == "n") f = 1e-9; if (s == "u") f = 1e-6; if (s == "m") f = 1e-3
    if (s ~ /^[eE][-+]?[0-9]+$/) f = 10 ^ substr(s, 2)
    printf "%.6f\n", n * f
  }'
}

# $1 name, $2 value, $3 cpu|bytes. Sets the global `amount` to the value in base units ('' when refused).
quantity() {
  local what=$1 v=$2 kind=$3 example
  amount=
  if [ "$kind" = cpu ]; then example="e.g. 2 or 500m"; else example="e.g. 8Gi (binary) or 8G (decimal)"; fi
  if [ -z "$v" ]; then fail "$what is empty: give a Kubernetes quantity ($example)"; return; fi
  amount=$(to_base "$v")
  if [ -z "$amount" ]; then
    fail "$what='$v' is not a Kubernetes quantity: $example (units Ki Mi Gi Ti for bytes; no 'B', no space)"
    return
  fi
  # Bytes in thousandths (m) or smaller are what a slip from Mi looks like; the API server rounds them up to 1 byte.
  if [ "$kind" = bytes ] && [[ $v =~ [num]$ ]]; then
    fail "$what='$v' is ${v%?} thousandths (or less) of a byte: did you mean ${v%?}Mi?"
    amount=
    return
  fi
  if awk -v a="$amount" 'BEGIN { exit !(a <= 0) }'; then fail "$what='$v' must be more than zero"; amount=; fi
}

quantity CACHE_SIZE "${CACHE_SIZE-}" bytes
quantity CPU_REQUEST "${CPU_REQUEST-}" cpu; cpu_request=$amount
quantity CPU_LIMIT "${CPU_LIMIT-}" cpu; cpu_limit=$amount
quantity MEMORY_REQUEST "${MEMORY_REQUEST-}" bytes; memory_request=$amount
quantity MEMORY_LIMIT "${MEMORY_LIMIT-}" bytes; memory_limit=$amount
# The API server refuses a pod whose request is over its limit; under KServe that surfaces only in the
# predictor's ReplicaSet events, long after the apply succeeded.
over() { [ -n "$1" ] && [ -n "$2" ] && awk -v r="$1" -v l="$2" 'BEGIN { exit !(r > l) }'; }
if over "$cpu_request" "$cpu_limit"; then fail "CPU_REQUEST='${CPU_REQUEST}' is over CPU_LIMIT='${CPU_LIMIT}': Kubernetes refuses a pod whose request is over its limit"; fi
if over "$memory_request" "$memory_limit"; then fail "MEMORY_REQUEST='${MEMORY_REQUEST}' is over MEMORY_LIMIT='${MEMORY_LIMIT}': Kubernetes refuses a pod whose request is over its limit"; fi

[ "$problems" = 0 ] || exit 2
