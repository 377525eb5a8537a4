#!/usr/bin/env python3
"""Checks LoRA support against diffusers on a tiny random Stable Diffusion pipeline, on the CPU:

    PYTHONPATH=<diffusers>/src:<peft>:scripts python3 scripts/check_lora_export.py WORK_DIR [FIXTURES_DIR]

1. A LoRA is trained-shaped with PEFT (random, non-zero) on the UNet (attention, feed-forward, projections, resnet
   3x3 convs, time projections) and the text encoder, saved with diffusers' `save_lora_weights` (diffusers/PEFT form,
   alpha in lora_adapter_metadata) and converted with diffusers' `convert_state_dict_to_kohya` (kohya form).
2. The base pipeline is exported with scripts/export_sd.py, plain float32 and fused float16 (the CUDA default; the
   fusions and the conversion run on the CPU, only serving them needs CUDA), each with its lora_map.json.
3. diffusers merges the adapter itself (load_lora_weights, fuse_lora(lora_scale), unload_lora_weights) and the
   merged pipeline is exported the same two ways.
4. The runtime's merge (`node dist/scripts/lora-merge.js`, the code a request's adapter set runs) is applied to the
   base exports with each file, and every mapped weight is compared with the diffusers-merged export, located through
   that export's own map: float32 within 1e-5 of the weight's scale (torch sums in float32, the runtime in float64),
   float16 within half a float16 unit of the base weight plus one of the result (the runtime adds to the float16
   weight and rounds, the export rounds the float32 merged one).

With FIXTURES_DIR, writes the test fixtures of test/lora.test.ts there (the two adapter files, the plain export's
maps, and diffusers' merged-minus-base updates as safetensors).
"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

work = sys.argv[1]
fixtures = sys.argv[2] if len(sys.argv) > 2 else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.7
os.makedirs(work, exist_ok=True)


def log(*a):
    print(time.strftime("%H:%M:%S"), "lora-check:", *a, flush=True)


from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import export_sd  # noqa: E402

torch.manual_seed(0)
unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64)
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=77, hidden_act="quick_gelu"))
tok = CLIPTokenizer(os.path.join(ROOT, "src/demo/assets/vocab.json"), os.path.join(ROOT, "src/demo/assets/merges.txt"))
pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=PNDMScheduler(), safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)

# 1. the adapter files
unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                      "conv_shortcut", "time_emb_proj"])
te_cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
trained = copy.deepcopy(pipe)
trained.unet.add_adapter(unet_cfg)
trained.text_encoder.add_adapter(te_cfg)
with torch.no_grad():
    for n, p in list(trained.unet.named_parameters()) + list(trained.text_encoder.named_parameters()):
        if "lora_" in n:
            p.mul_(0.3)  # a visible update, not one that swamps the weight
unet_sd = get_peft_model_state_dict(trained.unet)
te_sd = get_peft_model_state_dict(trained.text_encoder)
adir = os.path.join(work, "adapter")
StableDiffusionPipeline.save_lora_weights(adir, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                          unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
diffusers_file = os.path.join(adir, "pytorch_lora_weights.safetensors")
peft_sd = {f"unet.{k}": v for k, v in unet_sd.items()} | {f"text_encoder.{k}": v for k, v in te_sd.items()}
kohya_sd = convert_state_dict_to_kohya(peft_sd)
for k in [k for k in kohya_sd if k.endswith(".alpha")]:
    # diffusers' converter writes alpha = rank; kohya files carry the trained alpha.
    kohya_sd[k] = torch.tensor(float(unet_cfg.lora_alpha if k.startswith("lora_unet") else te_cfg.lora_alpha))
kohya_file = os.path.join(work, "kohya.safetensors")
save_file({k: v.contiguous() for k, v in kohya_sd.items()}, kohya_file, metadata={"ss_network_module": "networks.lora"})
log("adapter", len(load_file(diffusers_file)), "diffusers tensors,", len(kohya_sd), "kohya tensors")

# 3. diffusers merges it
merged = copy.deepcopy(pipe)
merged.load_lora_weights(diffusers_file)
merged.fuse_lora(lora_scale=SCALE)
merged.unload_lora_weights()

# 2. + 3. exports
results = {}
for variant, fused, fp16 in (("plain", False, False), ("fused", True, True)):
    for which, p in (("base", pipe), ("merged", merged)):
        out = os.path.join(work, f"{variant}-{which}")
        shutil.rmtree(out, ignore_errors=True)
        export_sd.export_pipeline(copy.deepcopy(p), out, fused=fused, fp16=fp16, device="cpu", vae_encoder=False)

# 4. the runtime's merge, compared
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402


def mapped(folder, comp):
    m = json.load(open(os.path.join(folder, comp, "lora_map.json")))
    # External data read here, not by onnx.load: onnx refuses data files with several hard links (the linked form).
    model = onnx.load(os.path.join(folder, comp, "model.onnx"), load_external_data=False)
    inits = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            dtype = {1: np.float32, 10: np.float16}.get(t.data_type)
            if dtype is None:
                continue
            with open(os.path.join(folder, comp, kv["location"]), "rb") as f:
                f.seek(int(kv.get("offset", 0)))
                inits[t.name] = np.frombuffer(f.read(int(kv["length"])), dtype=dtype).copy()
        else:
            inits[t.name] = numpy_helper.to_array(t).reshape(-1)
    out = {}
    for name, e in m["weights"].items():
        v = e["view"]
        idx = export_sd._view_index(v["shape"], v["strides"], v["offset"])
        out[name] = inits[e["initializer"]][idx].reshape(e["shape"])
    return out, m


failures = []
for variant in ("plain", "fused"):
    base_dir = os.path.join(work, f"{variant}-base")
    want_dir = os.path.join(work, f"{variant}-merged")
    # The self-contained copy (kohya file too) and the linked form adapter sets serve from (its own folder: the
    # patched weights in lora.onnx_data, the rest through a hard link to the base export's data).
    for label, file, linked in (("diffusers", diffusers_file, False), ("kohya", kohya_file, False), ("diffusers-linked", diffusers_file, True)):
        ours_dir = os.path.join(work, f"{variant}-ours-{label}")
        shutil.rmtree(ours_dir, ignore_errors=True)
        r = subprocess.run(["node", os.path.join(ROOT, "dist/scripts/lora-merge.js"), *(["--linked"] if linked else []), base_dir, ours_dir, f"{file}:{SCALE}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{variant}/{label}: lora-merge failed: {r.stderr.strip()[:500]}")
            continue
        for comp in ("unet", "text_encoder"):
            want, wmap = mapped(want_dir, comp)
            base, bmap = mapped(base_dir, comp)
            # A component the adapter touches comes back merged; the graph is the base export's, so its map applies.
            shutil.copy(os.path.join(base_dir, comp, "lora_map.json"), os.path.join(ours_dir, comp, "lora_map.json"))
            ours, _ = mapped(ours_dir, comp)
            changed = worst = 0
            for name, w in want.items():
                o, b = ours[name].astype(np.float64), base[name].astype(np.float64)
                if not np.array_equal(o, b):
                    changed += 1
                if variant == "plain":
                    err = float(np.abs(o - w.astype(np.float64)).max() / max(1e-12, float(np.abs(w).max())))
                    worst = max(worst, err)
                    if err > 1e-5:
                        failures.append(f"{variant}/{label}/{comp}/{name}: relative error {err:.3g}")
                else:
                    # Each side rounds once to float16 after the merge; ours also starts from the float16 base, so the
                    # bound is half a unit of the base plus one unit of the result (np.spacing in float16).
                    w16 = w.astype(np.float16)
                    bound = np.spacing(np.abs(b).astype(np.float16)).astype(np.float64) + np.spacing(np.abs(w16)).astype(np.float64)
                    ratio = float((np.abs(o - w16.astype(np.float64)) / bound).max())
                    worst = max(worst, ratio)
                    exact = float(np.mean(o == w16.astype(np.float64)))
                    results.setdefault("fused_exact_fraction", {})[f"{label}/{comp}/{name}"] = exact
                    if ratio > 1:
                        failures.append(f"{variant}/{label}/{comp}/{name}: {ratio:.3g} of the float16 rounding bound")
            results[f"{variant}/{label}/{comp}"] = {"weights": len(want), "changed_by_us": changed, "unmapped": len(bmap.get("unmapped", [])),
                                                    ("max_rel_err" if variant == "plain" else "max_of_fp16_bound"): worst}
            log(variant, label, comp, results[f"{variant}/{label}/{comp}"])

if fixtures:
    os.makedirs(fixtures, exist_ok=True)
    shutil.copy(diffusers_file, os.path.join(fixtures, "diffusers.safetensors"))
    shutil.copy(kohya_file, os.path.join(fixtures, "kohya.safetensors"))
    deltas = {}
    for comp, before, after in (("unet", pipe.unet, merged.unet), ("text_encoder", pipe.text_encoder, merged.text_encoder)):
        a, b = export_sd.lora_targets(before), export_sd.lora_targets(after)
        # One weight of each kind the adapter touches keeps the fixture small: attention (self and cross), the
        # feed-forward, projections, 3x3 and 1x1 convolutions, the time projection, the text encoder's layers.
        kinds = ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                 "resnets.0.conv1", "conv_shortcut", "time_emb_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
        for kind in kinds:
            name = next((n for n in a if f".{kind}.weight" in f".{n}" and np.any(b[n] != a[n])), None)
            if name is not None:
                d = b[name].astype(np.float64) - a[name].astype(np.float64)
                deltas[f"{comp}/{name}"] = torch.from_numpy((d / SCALE).astype(np.float32)).contiguous()
        shutil.copy(os.path.join(work, "plain-base", comp, "lora_map.json"), os.path.join(fixtures, f"{comp}.lora_map.json"))
    save_file(deltas, os.path.join(fixtures, "diffusers-deltas.safetensors"), metadata={"scale": "1", "note": "diffusers fuse_lora(lora_scale=0.7) minus base, divided by 0.7"})
    log("fixtures written to", fixtures, len(deltas), "deltas")

fractions = results.pop("fused_exact_fraction", {})
if fractions:
    results["fused_exact_fraction_min"] = min(fractions.values())
    results["fused_exact_fraction_mean"] = sum(fractions.values()) / len(fractions)
json.dump({"results": results, "failures": failures}, open(os.path.join(work, "check.json"), "w"), indent=1)
print(json.dumps({"results": results, "failures": failures[:20]}, indent=1))
sys.exit(1 if failures else 0)
