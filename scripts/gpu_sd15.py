#!/usr/bin/env python3
"""The GPU comparison's Python half: an SD 1.5-size pipeline with random weights (diffusers' own classes; speed does
not depend on weight values), timed in diffusers as users run it today, then exported plain and fused with
scripts/export_sd.py for the runtime to serve (scripts/bench-gpu.ts is the other half).

    PYTHONPATH=<diffusers>/src:scripts python3 scripts/gpu_sd15.py WORK_DIR REF_DIR RESULT_JSON

REF_DIR holds tokenizer/ (SD 1.5's CLIP tokenizer folder) and scheduler_config.json (PNDM, SD 1.5's). Writes
WORK_DIR/{plain,fused}/ (exports), WORK_DIR/ref-seed1.png (diffusers fp16, seed 1 drawn on the CPU in float32,
20 steps: the parity reference) and RESULT_JSON (timings), rewritten after every stage.
"""
import copy
import json
import os
import sys
import time

import numpy as np
import torch

work, ref, result_path = sys.argv[1:4]
# SD15_TINY=1 SD15_DEVICE=cpu: the same flow on small shapes, to check the script where no GPU is.
DEV = os.environ.get("SD15_DEVICE", "cuda")
TINY = os.environ.get("SD15_TINY") == "1"
SIZE, STEPS, STEPS_SHORT = (64, 3, 2) if TINY else (512, 50, 20)
# SD15_ONLY=fused: only the fused export (a rerun whose diffusers timing and plain export are already known).
ONLY_FUSED = os.environ.get("SD15_ONLY") == "fused"
os.makedirs(work, exist_ok=True)
res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV, "errors": []}
PROMPT = "a photo of an astronaut riding a horse"


def save():
    json.dump(res, open(result_path, "w"), indent=1)


def log(*a):
    print(time.strftime("%H:%M:%S"), "sd15:", *a, flush=True)


from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import export_sd  # noqa: E402

t0 = time.perf_counter()
torch.manual_seed(0)
W = (32, 64, 64, 64) if TINY else (320, 640, 1280, 1280)
unet = UNet2DConditionModel(sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=W,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(32, 32, 64, 64) if TINY else (128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=SIZE,
                    norm_num_groups=32)
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2 if TINY else 12, num_attention_heads=12,
                                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
tok = CLIPTokenizer.from_pretrained(os.path.join(ref, "tokenizer"))
sched = PNDMScheduler.from_config(json.load(open(os.path.join(ref, "scheduler_config.json"))))


def pipeline(u, v, t):
    return StableDiffusionPipeline(vae=v, text_encoder=t, tokenizer=tok, unet=u, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


res["params_millions"] = {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for n, m in (("unet", unet), ("vae", vae), ("text_encoder", te))}
fp32 = pipeline(unet, vae, te)
half = pipeline(copy.deepcopy(unet).to(DEV, torch.float16).eval(), copy.deepcopy(vae).to(DEV, torch.float16).eval(), copy.deepcopy(te).to(DEV, torch.float16).eval())
half.set_progress_bar_config(disable=True)
res["build_s"] = round(time.perf_counter() - t0, 1)
log("built", res["params_millions"], res["build_s"], "s")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def gen(steps, seed):
    sync()
    t = time.perf_counter()
    half(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE, generator=torch.Generator(DEV).manual_seed(seed))
    sync()
    return round(time.perf_counter() - t, 4)


try:
    if ONLY_FUSED:
        raise RuntimeError("skipped (SD15_ONLY=fused)")
    with torch.inference_mode():
        gen(STEPS, 0)
        runs = [gen(STEPS, s) for s in (1, 2, 3)]
        r20 = [gen(STEPS_SHORT, s) for s in (4, 5)]
        # The parity reference: latents drawn as the runtime draws them (CPU generator, float32), then half precision.
        lat = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(1), dtype=torch.float32).to(DEV, torch.float16)
        img = half(PROMPT, num_inference_steps=STEPS_SHORT, guidance_scale=7.5, height=SIZE, width=SIZE, latents=lat, output_type="np").images[0]
    from PIL import Image
    Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(work, "ref-seed1.png"))
    res["diffusers"] = {"attention": type(next(iter(half.unet.attn_processors.values()))).__name__, "size": SIZE, "steps": [STEPS, STEPS_SHORT],
                        "runs_50_s": runs, "median_50_s": sorted(runs)[1], "runs_20_s": r20,
                        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if DEV == "cuda" else None}
    log("diffusers", res["diffusers"])
except Exception as e:  # noqa: BLE001 - the exports still matter
    res["errors"].append(f"diffusers timing: {e!r}"[:500])
    log("diffusers timing failed", e)
save()

for variant, pipe, fused in (("plain", half, False), ("fused", fp32, True)):
    if ONLY_FUSED and not fused:
        del half
        continue
    try:
        t = time.perf_counter()
        m = export_sd.export_pipeline(pipe, os.path.join(work, variant), fused=fused, fp16=True, device=DEV, vae_encoder=True)
        res.setdefault("export", {})[variant] = {"seconds": round(time.perf_counter() - t, 1), "components": {
            c: {k: v for k, v in r.items() if k in ("dtype", "fused_ops", "fp32_nodes", "attention_fusion", "files", "seconds")} for c, r in m["components"].items()}}
        log(variant, "exported in", res["export"][variant]["seconds"], "s")
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        res["errors"].append(f"{variant} export: {e!r}"[:800])
    if variant == "plain":
        del half
        if DEV == "cuda":
            torch.cuda.empty_cache()
    save()
res["total_s"] = round(time.perf_counter() - t0, 1)
save()
log("done", res["total_s"], "s")
