#!/usr/bin/env python3
"""An SD 1.5-size pipeline with random weights (diffusers' own classes, built as scripts/gpu_sd15.py builds it, same
seed, so the same weights) on the CPU: exported plain float32 for the runtime's CPU provider, and run in diffusers to
give the image the runtime must reproduce (docs/BENCHMARKS.md, "SD 1.5 size on the CPU").

    PYTHONPATH=<diffusers>/src:scripts python3 scripts/cpu_sd15.py export REF_DIR OUT_DIR
    PYTHONPATH=<diffusers>/src:scripts python3 scripts/cpu_sd15.py reference REF_DIR OUT_PNG [--size 256] [--steps 4]
        [--seed 1] [--guidance 7.5] [--scheduler pndm|euler] [--prompt ...] [--negative ...]
        [--image IN.png --strength 0.6]

REF_DIR holds tokenizer/ (SD 1.5's CLIP tokenizer folder) and scheduler_config.json (SD 1.5's PNDM), e.g. a folder with
../shared/reference/e2e/model/tokenizer and .../scheduler/scheduler_config.json. The reference draws its latents as
the runtime does (torch.randn on a CPU generator seeded with the request's seed, float32) and writes OUT_PNG and
OUT_PNG.npy (the float image before quantisation) and OUT_PNG.json (what it ran, in seconds).
"""
import argparse
import json
import os
import resource
import sys
import time


def log(*a):
    print(time.strftime("%H:%M:%S"), "cpu_sd15:", *a, flush=True)


def build(ref):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    # The construction order and shapes are gpu_sd15.py's (SD 1.5: 859.5 M UNet parameters).
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512, norm_num_groups=32)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    tok = CLIPTokenizer.from_pretrained(os.path.join(ref, "tokenizer"))
    sched = PNDMScheduler.from_config(json.load(open(os.path.join(ref, "scheduler_config.json"))))
    return unet.eval(), vae.eval(), te.eval(), tok, sched


def peak_rss_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cmd_export(a):
    from diffusers import StableDiffusionPipeline
    import export_sd
    t0 = time.perf_counter()
    unet, vae, te, tok, sched = build(a.ref)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    built = time.perf_counter() - t0
    log(f"built in {built:.1f} s; params (M):", {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for n, m in (("unet", unet), ("vae", vae), ("text_encoder", te))})
    m = export_sd.export_pipeline(pipe, a.out, fused=False, fp16=False, device="cpu", vae_encoder=True)
    log(f"exported in {m['seconds']} s (build {built:.1f} s), peak RSS {peak_rss_mib()} MiB:",
        {c: r.get("seconds") for c, r in m["components"].items()})


def cmd_reference(a):
    import numpy as np
    import torch
    from PIL import Image
    t0 = time.perf_counter()
    unet, vae, te, tok, sched = build(a.ref)
    if a.scheduler == "euler":
        from diffusers import EulerDiscreteScheduler
        sched = EulerDiscreteScheduler.from_config(sched.config)
    kw = dict(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    gen = torch.Generator("cpu").manual_seed(a.seed)
    t1 = time.perf_counter()
    with torch.inference_mode():
        if a.image:
            from diffusers import StableDiffusionImg2ImgPipeline
            pipe = StableDiffusionImg2ImgPipeline(**kw)
            init = Image.open(a.image).convert("RGB")
            out = pipe(a.prompt, image=init, strength=a.strength, negative_prompt=a.negative or None, num_inference_steps=a.steps, guidance_scale=a.guidance,
                       generator=gen, output_type="np")
        else:
            from diffusers import StableDiffusionPipeline
            pipe = StableDiffusionPipeline(**kw)
            lat = torch.randn((1, 4, a.size // 8, a.size // 8), generator=gen, dtype=torch.float32)
            out = pipe(a.prompt, negative_prompt=a.negative or None, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                       latents=lat, output_type="np")
    img = out.images[0]
    gen_s = time.perf_counter() - t1
    np.save(a.out + ".npy", img.astype(np.float32))
    # numpy's round (half to even) of x*255 in float32, as diffusers' numpy_to_pil does it.
    Image.fromarray((img * 255).round().astype(np.uint8)).save(a.out)
    info = {"prompt": a.prompt, "negative_prompt": a.negative, "seed": a.seed, "steps": a.steps, "guidance": a.guidance, "size": a.size,
            "scheduler": type(sched).__name__, "image": a.image, "strength": a.strength if a.image else None, "build_s": round(t1 - t0, 1),
            "generate_s": round(gen_s, 1), "peak_rss_mib": peak_rss_mib()}
    json.dump(info, open(a.out + ".json", "w"), indent=1)
    log("reference", info)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("ref")
    e.add_argument("out")
    r = sub.add_parser("reference")
    r.add_argument("ref")
    r.add_argument("out")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--scheduler", choices=("pndm", "euler"), default="pndm")
    r.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    r.add_argument("--negative", default="")
    r.add_argument("--image", default=None)
    r.add_argument("--strength", type=float, default=0.6)
    a = ap.parse_args()
    {"export": cmd_export, "reference": cmd_reference}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
