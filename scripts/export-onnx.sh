#!/usr/bin/env bash
# Export a Hugging Face diffusers model to the ONNX layout diffusers-runtime serves, check the
# layout, and optionally upload it to S3.
#
#   scripts/export-onnx.sh MODEL_ID OUT_DIR [--plain] [--fp16|--fp32] [--device cuda|cpu]
#                          [--config DIFFUSERS_FOLDER_OR_ID] [--allow-pickle]
#                          [--push s3://bucket/prefix [--replace]] [--container] [--task TASK] [-- EXTRA ARGS]
#
#   MODEL_ID     Hugging Face id (stable-diffusion-v1-5/stable-diffusion-v1-5,
#                stabilityai/sdxl-turbo, ...), a local diffusers folder, or a single-file
#                checkpoint (model.safetensors in the original layout: civitai models,
#                v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors), read with
#                diffusers' from_single_file; --plain on a single file uses export_sd.py --plain
#   --config C   single file: a diffusers folder or hub id of the same architecture, whose
#                configs, tokenizers and scheduler go with the weights (default: the hub config
#                diffusers infers from the checkpoint's keys; offline, pass a local folder)
#   --allow-pickle  single file: accept a .ckpt/.pt/.pth/.bin. Those are Python pickles and
#                loading a pickle can run code hidden in it: only for files you trust
#   OUT_DIR      where the export goes (model_index.json, unet/model.onnx, ...)
#   (default)    the fused float16 export for the CUDA execution provider: scripts/export_sd.py
#                traces float32 graphs, runs onnxruntime's transformer optimizer on each
#                component and converts them to float16 (what stays float32 is listed in
#                OUT_DIR/onnx_export.json). Tracing runs on the CPU too; no GPU is needed.
#   --fp32       with the default: skip the float16 conversion (still fused, still CUDA-only)
#   --device D   torch device for tracing (default: cuda when torch sees one, else cpu)
#   --plain      the unfused optimum export, for the CPU execution provider (or any)
#   --fp16       with --plain: float16 (optimum: --dtype fp16 --device cuda; needs a CUDA GPU)
#   --push URI   then upload OUT_DIR with `node dist/warmup/main.js push OUT_DIR URI`; a prefix
#                holding objects the export lacks is refused (a server would load them too)
#   --replace    with --push: delete those objects once the upload is done
#                (S3 settings from the usual env: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#                AWS_ENDPOINT_URL / AWS_S3_ENDPOINT, AWS_REGION; run `npm run build` first)
#   --container  run the export in a container (docker or podman, python image) instead of a venv
#   --task TASK  with --plain: optimum task when it cannot be inferred (e.g. text-to-image)
#   -- ARGS      passed on to scripts/export_sd.py (or to optimum-cli with --plain)
#
# Environment: EXPORT_PYTHON (a Python that already has the packages: used as it is, nothing is
# created or installed), VENV (default .venv-export), PYTHON (python3), PIP_PACKAGES (default
# "torch diffusers transformers onnx onnxruntime", with --plain "optimum[exporters] diffusers";
# use "optimum-onnx diffusers" for optimum >= 2, where the ONNX exporter moved to the
# optimum-onnx package), HF_TOKEN (gated models), CONTAINER_ENGINE, PYTHON_IMAGE (default
# python:3.11-slim).
set -euo pipefail

die() { echo "export-onnx: $*" >&2; exit 1; }
# The comment block at the top of this file, without its '# ' (and nothing after it).
usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

[[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; exit 2; }

model_id=$1
out_dir=$2
shift 2
fp16=0
fp32=0
plain=0
device=""
push_uri=""
replace=""
use_container=0
task=""
config=""
allow_pickle=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --fp16) fp16=1 ;;
    --fp32) fp32=1 ;;
    --plain) plain=1 ;;
    --device) [[ $# -ge 2 ]] || die "--device needs cuda or cpu"; device=$2; shift ;;
    --push) [[ $# -ge 2 ]] || die "--push needs s3://bucket/prefix"; push_uri=$2; shift ;;
    --push=*) push_uri=${1#--push=} ;;
    --replace) replace=1 ;;
    --container) use_container=1 ;;
    --task) [[ $# -ge 2 ]] || die "--task needs a value"; task=$2; shift ;;
    --config) [[ $# -ge 2 ]] || die "--config needs a diffusers folder or hub id"; config=$2; shift ;;
    --config=*) config=${1#--config=} ;;
    --allow-pickle) allow_pickle=1 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
# A single-file checkpoint: by its extension, or any regular file (export_sd.py says what it is not).
single=0
shopt -s nocasematch
if [[ $model_id =~ \.(safetensors|ckpt|pt|pth|bin)$ || -f $model_id ]]; then single=1; fi
pickle=0
[[ $model_id =~ \.(ckpt|pt|pth|bin)$ ]] && pickle=1
shopt -u nocasematch
if [[ $single == 1 ]]; then
  [[ -e $model_id ]] || die "$model_id: no such file"
  [[ -f $model_id ]] || die "$model_id is not a file (a single-file checkpoint is one .safetensors file)"
  if [[ $pickle == 1 && $allow_pickle == 0 ]]; then
    die "$(basename "$model_id") is a Python pickle: loading a pickle can run code hidden in the file. Prefer the model's .safetensors file; if you trust this one, pass --allow-pickle"
  fi
  [[ -z $task ]] || die "--task is for optimum-cli; a single file is exported by export_sd.py"
else
  [[ -z $config ]] || die "--config is for single-file checkpoints (.safetensors, .ckpt); a diffusers folder or id carries its own"
  [[ $allow_pickle == 0 ]] || die "--allow-pickle is for single-file checkpoints (.ckpt)"
fi
if [[ -n $push_uri && ! $push_uri =~ ^s3://[^/]+ ]]; then die "--push wants s3://bucket/prefix, got '$push_uri'"; fi
if [[ $replace == 1 && -z $push_uri ]]; then die "--replace goes with --push"; fi
if [[ $plain == 1 ]]; then
  [[ $fp32 == 0 ]] || die "--fp32 is for the fused export; a --plain export is float32 unless --fp16"
  [[ -z $device ]] || die "--device is for the fused export; --plain --fp16 traces on cuda"
else
  [[ $fp16 == 0 ]] || die "--fp16 is for --plain; the default fused export is float16 already (--fp32 keeps float32)"
  [[ -z $task ]] || die "--task is for --plain (optimum-cli)"
  [[ -z $device || $device == cuda || $device == cpu ]] || die "--device must be cuda or cpu, got '$device'"
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# optimum cannot read a single file: its --plain export is export_sd.py --plain.
use_optimum=$((plain == 1 && single == 0))
if [[ $use_optimum == 1 ]]; then pip_packages=${PIP_PACKAGES:-"optimum[exporters] diffusers"}
else pip_packages=${PIP_PACKAGES:-"torch diffusers transformers onnx onnxruntime"}; fi
mkdir -p "$out_dir"
out_abs=$(cd "$out_dir" && pwd)

if [[ $use_optimum == 1 ]]; then
  opt_args=(export onnx --model "$model_id")
  [[ $fp16 == 1 ]] && opt_args+=(--dtype fp16 --device cuda)
  [[ -n $task ]] && opt_args+=(--task "$task")
  opt_args+=("${extra[@]}")
else
  fused_args=("$model_id")
  if [[ $plain == 1 ]]; then
    fused_args+=(--plain)
    if [[ $fp16 == 1 ]]; then fused_args+=(--device cuda); else fused_args+=(--fp32); fi
  else
    [[ $fp32 == 1 ]] && fused_args+=(--fp32)
    [[ -n $device ]] && fused_args+=(--device "$device")
  fi
  [[ -n $config ]] && fused_args+=(--config "$config")
  [[ $allow_pickle == 1 ]] && fused_args+=(--allow-pickle)
  fused_args+=("${extra[@]}")
fi

# export_sd.py refuses a non-empty folder; so does a careful user: say so before any download.
if [[ $use_optimum == 0 && -n $(ls -A "$out_abs") ]]; then die "$out_abs is not empty"; fi

if [[ $use_container == 1 ]]; then
  engine=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
  [[ -n $engine ]] || die "--container needs docker or podman"
  image=${PYTHON_IMAGE:-python:3.11-slim}
  run_opts=(--rm -v "$out_abs:/out" -e HF_TOKEN -e HF_HUB_ENABLE_HF_TRANSFER)
  gpu=0
  if [[ -d $model_id ]]; then
    run_opts+=(-v "$(cd "$model_id" && pwd):/model:ro")
    if [[ $use_optimum == 1 ]]; then opt_args[3]=/model; else fused_args[0]=/model; fi
  elif [[ $single == 1 ]]; then
    run_opts+=(-v "$(cd "$(dirname "$model_id")" && pwd)/$(basename "$model_id"):/model/$(basename "$model_id"):ro")
    fused_args[0]=/model/$(basename "$model_id")
  fi
  if [[ -n $config && -d $config ]]; then
    run_opts+=(-v "$(cd "$config" && pwd):/config:ro")
    for i in "${!fused_args[@]}"; do [[ ${fused_args[$i]} == --config ]] && fused_args[i + 1]=/config; done
  fi
  [[ $plain == 1 && $fp16 == 1 ]] && gpu=1
  [[ $plain == 0 && $device == cuda ]] && gpu=1
  if [[ $gpu == 1 ]]; then
    if [[ $(basename "$engine") == podman ]]; then run_opts+=(--device nvidia.com/gpu=all); else run_opts+=(--gpus all); fi
  fi
  # The export runs as the image's root user; hand the files back to the caller afterwards.
  if [[ $use_optimum == 1 ]]; then
    inner="pip install --no-cache-dir $pip_packages && optimum-cli \"\$@\" /out && chown -R $(id -u):$(id -g) /out"
    echo "export-onnx: $engine run $image: optimum-cli ${opt_args[*]} /out"
    "$engine" run "${run_opts[@]}" "$image" bash -c "$inner" optimum-cli "${opt_args[@]}"
  else
    run_opts+=(-v "$repo_root/scripts/export_sd.py:/export_sd.py:ro")
    inner="pip install --no-cache-dir $pip_packages && python /export_sd.py \"\${@:1:1}\" /out \"\${@:2}\" && chown -R $(id -u):$(id -g) /out"
    echo "export-onnx: $engine run $image: export_sd.py ${fused_args[*]} /out"
    "$engine" run "${run_opts[@]}" "$image" bash -c "$inner" export "${fused_args[@]}"
  fi
else
  modules="torch, diffusers, transformers, onnx, onnxruntime.transformers.optimizer, safetensors"
  if [[ -n ${EXPORT_PYTHON:-} ]]; then
    # A Python the caller has set up (offline machines, clusters without PyPI): used as it is.
    py=$EXPORT_PYTHON
    if [[ $use_optimum == 1 ]]; then
      run_optimum=("$py" -m optimum.commands.optimum_cli)
      "${run_optimum[@]}" --help >/dev/null 2>&1 || die "EXPORT_PYTHON=$py cannot run optimum-cli (python -m optimum.commands.optimum_cli); install optimum there, or leave EXPORT_PYTHON unset to use a venv"
    else
      why=$("$py" -c "import $modules" 2>&1 | tail -n 1) || die "EXPORT_PYTHON=$py lacks a package the export needs ($why); it needs $modules"
    fi
  else
    venv=${VENV:-.venv-export}
    python=${PYTHON:-python3}
    py=$venv/bin/python
    run_optimum=("$venv/bin/optimum-cli")
    if [[ $use_optimum == 1 ]]; then ready_check=("$venv/bin/optimum-cli" --help)
    else ready_check=("$py" -c "import $modules"); fi
    if ! "${ready_check[@]}" >/dev/null 2>&1; then
      command -v "$python" >/dev/null || die "$python not found (or use --container, or EXPORT_PYTHON)"
      echo "export-onnx: creating $venv and installing $pip_packages"
      [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
      # shellcheck disable=SC2086 # the package list is meant to split into words
      "$venv/bin/pip" install --upgrade pip $pip_packages ||
        die "installing $pip_packages into $venv failed; without access to PyPI set EXPORT_PYTHON to a Python that has them ($modules)"
    fi
  fi
  if [[ $use_optimum == 1 ]]; then
    echo "export-onnx: optimum-cli ${opt_args[*]} $out_abs"
    "${run_optimum[@]}" "${opt_args[@]}" "$out_abs"
  else
    what="fused float16 for CUDA; --plain for CPU serving"
    [[ $plain == 1 ]] && what="plain, for any execution provider"
    echo "export-onnx: export_sd.py ${fused_args[*]} $out_abs ($what)"
    "$py" "$repo_root/scripts/export_sd.py" "${fused_args[0]}" "$out_abs" "${fused_args[@]:1}"
  fi
fi

# The layout the runtime serves (DESIGN "Model format").
missing=()
for f in model_index.json scheduler/scheduler_config.json tokenizer/vocab.json tokenizer/merges.txt \
         text_encoder/model.onnx unet/model.onnx vae_decoder/model.onnx; do
  [[ -f $out_abs/$f ]] || missing+=("$f")
done
if grep -q '"text_encoder_2"' "$out_abs/model_index.json" 2>/dev/null; then
  for f in text_encoder_2/model.onnx tokenizer_2/vocab.json; do
    [[ -f $out_abs/$f ]] || missing+=("$f")
  done
fi
[[ ${#missing[@]} -eq 0 ]] || die "export in $out_abs is incomplete, missing: ${missing[*]}"
echo "export-onnx: layout ok in $out_abs"
du -sh "$out_abs"/*/ 2>/dev/null | sed 's/^/  /' || true

if [[ -n $push_uri ]]; then
  warmup_js=$repo_root/dist/warmup/main.js
  [[ -f $warmup_js ]] || die "$warmup_js not found: run 'npm ci && npm run build' first"
  echo "export-onnx: uploading to $push_uri"
  node "$warmup_js" push "$out_abs" "$push_uri" ${replace:+--replace}
  echo "export-onnx: done; serve it with STORAGE_URI=$push_uri"
fi
