"""Writes test/fixtures/reference/img2img/: tiny random-weight SD pipelines (a 4-channel UNet and a 9-channel inpainting
UNet sharing one text encoder and VAE), exported with scripts/export_sd.py, and images that diffusers' own
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline made from them, plus what diffusers' image processors
make of a few inputs (resize modes, masks) for the preprocessing tests.

    git --git-dir=<diffusers mirror> archive HEAD src/diffusers | tar x -C /tmp/diffusers-src
    PYTHONHASHSEED=0 PYTHONPATH=/tmp/diffusers-src/src:scripts python scripts/make-img2img-reference.py TOKENIZER_DIR OUT_DIR

TOKENIZER_DIR is a CLIP tokenizer folder with vocab.json and merges.txt (the e2e reference model's, unpacked:
`node dist/scripts/reference.js e2e/model/tokenizer`). Needs torch, transformers, numpy, Pillow, onnx; CPU only, a
minute or so. Everything is seeded: the same diffusers and torch give the same files (PYTHONHASHSEED=0 keeps the order
of the `_use_default_values` lists diffusers writes from sets).
"""
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import export_sd

warnings.filterwarnings("ignore")
tok_dir, out = sys.argv[1:3]
os.makedirs(out, exist_ok=True)

# The runtime's request scheduler names (src/pipeline/schedulers/index.ts SCHEDULER_NAMES) used by the cases.
REQUEST = {
    None: None,
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
}
SD15_PNDM = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}


def save_npy(path, a):
    np.save(path, np.ascontiguousarray(a, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Models

torch.manual_seed(0)
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16))
with torch.no_grad():
    # Five levels instead of N(0, 0.02): the 49408-row table compresses to a fraction of its size, and different
    # tokens still embed differently (the random init rounds to zero at any coarse step).
    emb = te.get_input_embeddings().weight
    emb.copy_(torch.randint(-2, 3, emb.shape, generator=torch.Generator().manual_seed(1)).float() * 0.5)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)


def unet(in_channels):
    torch.manual_seed(2)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, flip_sin_to_cos=True, freq_shift=0)


unet4, unet9 = unet(4), unet(9)
tok = CLIPTokenizer.from_pretrained(tok_dir)
sched = PNDMScheduler.from_config(SD15_PNDM)
common = dict(vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
sd = StableDiffusionPipeline(unet=unet4, **common)
inpaint = StableDiffusionInpaintPipeline(unet=unet9, **common)
for p in (sd, inpaint):
    p.set_progress_bar_config(disable=True)

with tempfile.TemporaryDirectory() as tmp:
    for name, pipe in (("sd", sd), ("inpaint", inpaint)):
        export_sd.export_pipeline(pipe, os.path.join(tmp, name), fused=False, fp16=False, device="cpu")
    # Shared parts once (common/), each UNet and pipeline index in its own folder; the tests assemble the two models.
    mdir = os.path.join(out, "model")
    shutil.rmtree(mdir, ignore_errors=True)
    for comp in ("text_encoder", "vae_encoder", "vae_decoder", "scheduler"):
        shutil.copytree(os.path.join(tmp, "sd", comp), os.path.join(mdir, "common", comp))
    for name in ("sd", "inpaint"):
        shutil.copytree(os.path.join(tmp, name, "unet"), os.path.join(mdir, name, "unet"))
        for f in ("model_index.json", "onnx_export.json"):
            shutil.copy(os.path.join(tmp, name, f), os.path.join(mdir, name, f))

# ---------------------------------------------------------------------------------------------------------------
# Inputs: deterministic synthetic pictures (smooth shapes, edges, a little texture) and masks, as PNG.

inputs = os.path.join(out, "inputs")
os.makedirs(inputs, exist_ok=True)


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / w * 3.1 + seed) * np.cos(y / h * 2.3)
    g = 60 + 150 * (x + y) / (w + h)
    b = 200 - 120 * ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.3) ** 2)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def mask(w, h, seed):
    # A white (repaint) blob with soft-ish edges: grey values either side of 128 test the binarisation.
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.sqrt(((x - w * (0.35 + 0.1 * seed)) / (w * 0.3)) ** 2 + ((y - h * 0.55) / (h * 0.35)) ** 2)
    v = np.clip((1.2 - d) * 400, 0, 255)
    return Image.fromarray(np.repeat(np.round(v).astype(np.uint8)[..., None], 3, -1), "RGB")


# The exported tiny UNet downsamples once (ONNX traces a fixed 2x upsample): generations need sides that are multiples
# of 16. pic-77x61 (preprocessing only) rounds down to 72x56; pic-83x69 to 80x64.
PICS = {"pic-77x61.png": picture(77, 61, 1), "pic-83x69.png": picture(83, 69, 7), "pic-80x48.png": picture(80, 48, 2), "pic-64x64.png": picture(64, 64, 3),
        "pic-80x72.png": picture(80, 72, 4), "pic-40x24.png": picture(40, 24, 5), "pic-61x77.png": picture(61, 77, 6)}
MASKS = {"mask-64x64.png": mask(64, 64, 0), "mask-80x72.png": mask(80, 72, 1), "mask-77x61.png": mask(77, 61, 2)}
for n, im in {**PICS, **MASKS}.items():
    im.save(os.path.join(inputs, n))
# Lossy formats, to check that decoding agrees with Pillow's: JPEG (4:2:0) and lossy WebP of the same picture.
PICS["pic-77x61.png"].save(os.path.join(inputs, "pic-77x61.jpg"), quality=90)
PICS["pic-77x61.png"].save(os.path.join(inputs, "pic-77x61.webp"), quality=80)
# CMYK JPEGs (Adobe's inverted CMYK, as Pillow and Photoshop write it; one with EXIF orientation 6): Pillow converts
# CMYK to RGB by a plain formula, without colour management.
PICS["pic-77x61.png"].convert("CMYK").save(os.path.join(inputs, "pic-77x61-cmyk.jpg"), quality=90)
_exif = Image.Exif()
_exif[0x0112] = 6
PICS["pic-77x61.png"].convert("CMYK").save(os.path.join(inputs, "pic-77x61-cmyk-rot6.jpg"), quality=90, exif=_exif.tobytes())


def load(name):
    # diffusers.utils.load_image: EXIF transpose, then RGB.
    from PIL import ImageOps
    return ImageOps.exif_transpose(Image.open(os.path.join(inputs, name))).convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Image processor vectors: what VaeImageProcessor makes of an input at a size and resize mode.

pre = os.path.join(out, "preprocess")
os.makedirs(pre, exist_ok=True)
ip = VaeImageProcessor(vae_scale_factor=8)
mp = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
PRE_CASES = [
    ("image", "pic-77x61.png", None, None, "default"),
    ("image", "pic-77x61.png", 64, 64, "default"),
    ("image", "pic-40x24.png", 64, 64, "default"),
    ("image", "pic-77x61.png", 48, 64, "crop"),
    ("image", "pic-61x77.png", 48, 64, "crop"),
    ("image", "pic-77x61.png", 64, 64, "fill"),
    ("image", "pic-61x77.png", 48, 64, "fill"),
    ("image", "pic-77x61.jpg", None, None, "default"),
    ("image", "pic-77x61.webp", None, None, "default"),
    ("mask", "mask-77x61.png", 48, 64, "default"),
    ("mask", "mask-80x72.png", 64, 64, "fill"),
]
pre_index = []
for i, (kind, name, h, w, mode) in enumerate(PRE_CASES):
    proc = ip if kind == "image" else mp
    t = proc.preprocess(load(name), height=h, width=w, resize_mode=mode)
    fn = f"{i:02d}-{kind}-{os.path.splitext(name)[0]}-{mode}.npy"
    save_npy(os.path.join(pre, fn), t.numpy())
    pre_index.append({"kind": kind, "input": name, "height": h, "width": w, "resize_mode": mode, "expected": fn, "shape": list(t.shape)})
# The decoded pixels of the lossy files, as Pillow decodes them (the runtime decodes with sharp/libvips).
for name, tag in (("pic-77x61.jpg", "jpg"), ("pic-77x61.webp", "webp"), ("pic-77x61-cmyk.jpg", "cmyk"), ("pic-77x61-cmyk-rot6.jpg", "cmyk-rot6")):
    load(name).save(os.path.join(pre, f"decoded-{tag}.png"))
json.dump({"diffusers": diffusers.__version__, "cases": pre_index}, open(os.path.join(pre, "index.json"), "w"), indent=1)

# Pillow's Image.resize on random small images, sizes and boxes (Lanczos and bicubic, RGB and L): the resampler the
# processors above use, on more shapes than they reach (zero-width boxes as resize_mode "fill" uses included).
import base64  # noqa: E402

rng = np.random.default_rng(7)
rs = []
for k in range(40):
    w, h = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    ow, oh = int(rng.integers(1, 48)), int(rng.integers(1, 48))
    mode = "RGB" if k % 3 else "L"
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    if k % 2:  # smooth images stress the rounding of flat areas
        yy, xx = np.mgrid[0:h, 0:w]
        base_ = 128 + 120 * np.sin(xx / 5.0) * np.cos(yy / 4.0)
        arr = np.clip(np.round((base_[..., None] if mode == "RGB" else base_) + (arr.astype(float) - 128) * 0.05), 0, 255).astype(np.uint8)
    box = None
    if k % 4 == 3:
        x0, y0 = float(rng.integers(0, w)), float(rng.integers(0, h))
        box = (x0, y0, float(rng.integers(int(x0), w + 1)), float(rng.integers(int(y0), h + 1)))
    flt = Image.Resampling.LANCZOS if k % 5 else Image.Resampling.BICUBIC
    resized = np.array(Image.fromarray(arr, mode).resize((ow, oh), resample=flt, box=box))
    rs.append({"width": w, "height": h, "channels": 3 if mode == "RGB" else 1, "out_width": ow, "out_height": oh, "box": box,
               "filter": "lanczos" if flt == Image.Resampling.LANCZOS else "bicubic", "input": base64.b64encode(arr.tobytes()).decode(),
               "output": base64.b64encode(resized.tobytes()).decode()})
arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
for size, box in (((30, 5), (0, 0, 30, 0)), ((30, 5), (0, 20, 30, 20)), ((4, 20), (30, 0, 30, 20))):
    resized = np.array(Image.fromarray(arr, "RGB").resize(size, resample=Image.Resampling.BICUBIC, box=box))
    rs.append({"width": 30, "height": 20, "channels": 3, "out_width": size[0], "out_height": size[1], "box": box, "filter": "bicubic",
               "input": base64.b64encode(arr.tobytes()).decode(), "output": base64.b64encode(resized.tobytes()).decode()})
import PIL  # noqa: E402

json.dump({"pillow": PIL.__version__, "cases": rs}, open(os.path.join(pre, "resample.json"), "w"))

# ---------------------------------------------------------------------------------------------------------------
# Scheduler vectors: the schedule cut by strength (get_timesteps, set_begin_index), add_noise at the start and after
# every step (the inpainting blend), and the steps themselves on the cut schedule, with synthetic model outputs.

from diffusers import LCMScheduler  # noqa: E402

SCHED_CASES = [
    (None, 10, 0.6), (None, 7, 1.0), ("ddim", 10, 0.45), ("euler", 9, 0.7), ("euler_a", 8, 0.5), ("dpmpp_2m", 12, 0.5),
    ("dpmpp_2m", 6, 1.0), ("lcm", 4, 0.75),
]
REQUEST["lcm"] = (LCMScheduler, {})
sched_out = []
for k, (name, n_steps, strength) in enumerate(SCHED_CASES):
    base = sd.scheduler if REQUEST[name] is None else REQUEST[name][0].from_config(sd.scheduler.config, **REQUEST[name][1])
    s = type(base).from_config(base.config)
    s.set_timesteps(n_steps)
    full = [float(t) for t in s.timesteps]
    sigmas = [float(x) for x in s.sigmas] if hasattr(s, "sigmas") else None
    init_timestep = min(int(n_steps * strength), n_steps)
    begin = max(n_steps - init_timestep, 0) * s.order
    ts = s.timesteps[begin:]
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(begin)
    rng = np.random.default_rng(100 + k)
    shape = (1, 4, 2, 2)
    x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    latents = s.add_noise(x0, noise, ts[:1])
    rec = {"request": name, "scheduler": type(s).__name__, "config": dict(s.config), "num_inference_steps": n_steps, "strength": strength,
           "begin_index": begin, "timesteps": full, "sigmas": sigmas, "original": x0.flatten().tolist(), "noise": noise.flatten().tolist(),
           "noised": latents.flatten().tolist(), "steps": []}
    for i, t in enumerate(ts):
        scaled = s.scale_model_input(latents, t)
        mo = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * 0.5 + 0.1 * latents).float()
        step_noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))
        extra = {"generator": torch.Generator().manual_seed(1000 + i)} if "generator" in inspect.signature(s.step).parameters else {}
        r = s.step(mo, t, latents, return_dict=True, **extra)
        blend = s.add_noise(x0, noise, torch.tensor([ts[i + 1]])) if i < len(ts) - 1 else None
        rec["steps"].append({"t": float(t), "scaled_input": scaled.flatten().tolist(), "model_output": mo.flatten().tolist(),
                             "noise": step_noise.flatten().tolist(), "prev_sample": r.prev_sample.flatten().tolist(),
                             "blend_noised": None if blend is None else blend.flatten().tolist()})
        latents = r.prev_sample
    sched_out.append(rec)
json.dump({"diffusers": diffusers.__version__, "cases": sched_out}, open(os.path.join(out, "schedulers.json"), "w"), indent=None, default=str)

# ---------------------------------------------------------------------------------------------------------------
# Generations


def with_scheduler(pipe, name):
    """A request's scheduler name as users switch schedulers (and as the runtime does): `pipe.scheduler =
    Class.from_config(pipe.scheduler.config, **overrides)` on the built pipeline, so its __init__ rewrites
    (clip_sample, steps_offset) do not apply to the new scheduler."""
    if REQUEST[name] is None:
        return pipe
    cls, over = REQUEST[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **over)
    return pipe


def generators(seed, n):
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return gens[0] if n == 1 else gens


CASES = [
    # id, mode, model, image, mask, request fields
    ("i2i_pndm_s060", "img2img", "sd", "pic-83x69.png", None, dict(prompt="a red barn in a green field", strength=0.6, num_inference_steps=10, guidance_scale=7.5, seed=7)),
    ("i2i_euler_a_s075_n2", "img2img", "sd", "pic-80x48.png", None, dict(prompt="a watercolor of a harbour", negative_prompt="blurry", strength=0.75, num_inference_steps=8,
                                                                        guidance_scale=6.0, seed=11, num_images_per_prompt=2, scheduler="euler_a")),
    ("i2i_dpmpp_s050", "img2img", "sd", "pic-64x64.png", None, dict(prompt="an oil painting of mountains", strength=0.5, num_inference_steps=12, guidance_scale=5.0,
                                                                   seed=3, scheduler="dpmpp_2m")),
    ("i2i_ddim_s100", "img2img", "sd", "pic-80x48.png", None, dict(prompt="a city at night", strength=1.0, num_inference_steps=6, guidance_scale=7.5, seed=5, scheduler="ddim")),
    ("inp9_pndm_s100", "inpaint", "inpaint", "pic-64x64.png", "mask-64x64.png", dict(prompt="a yellow flower", strength=1.0, num_inference_steps=10, guidance_scale=7.5,
                                                                                   seed=21, height=64, width=64)),
    ("inp9_euler_a_s070_n2", "inpaint", "inpaint", "pic-80x72.png", "mask-80x72.png", dict(prompt="a stone wall", strength=0.7, num_inference_steps=9, guidance_scale=7.0,
                                                                                         seed=31, num_images_per_prompt=2, scheduler="euler_a", height=64, width=64)),
    ("inp4_pndm_s100", "inpaint", "sd", "pic-64x64.png", "mask-64x64.png", dict(prompt="a blue door", strength=1.0, num_inference_steps=8, guidance_scale=7.5, seed=41,
                                                                              height=64, width=64)),
    # Ancestral: the steps draw after the masked image's (unused) posterior sample, so its draw must happen.
    ("inp4_euler_a_s100_n2", "inpaint", "sd", "pic-64x64.png", "mask-64x64.png", dict(prompt="a red kite", strength=1.0, num_inference_steps=6, guidance_scale=7.5,
                                                                                   seed=61, num_images_per_prompt=2, scheduler="euler_a", height=64, width=64)),
    ("inp4_euler_s080", "inpaint", "sd", "pic-80x72.png", "mask-80x72.png", dict(prompt="a wooden boat", strength=0.8, num_inference_steps=10, guidance_scale=7.5, seed=51,
                                                                               scheduler="euler", height=64, width=80)),
]
cases_dir = os.path.join(out, "cases")
shutil.rmtree(cases_dir, ignore_errors=True)
for cid, mode, model, image, mask_name, req in CASES:
    base = {"sd": sd, "inpaint": inpaint}[model]
    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    pipe = with_scheduler(cls(**base.components), req.get("scheduler"))
    pipe.set_progress_bar_config(disable=True)
    n = req.get("num_images_per_prompt", 1)
    kw = dict(prompt=req["prompt"], negative_prompt=req.get("negative_prompt"), image=load(image), strength=req["strength"],
              num_inference_steps=req["num_inference_steps"], guidance_scale=req["guidance_scale"], num_images_per_prompt=n,
              generator=generators(req["seed"], n), output_type="np")
    if mode == "inpaint":
        kw.update(mask_image=load(mask_name), height=req["height"], width=req["width"])
    captured = {}
    orig = pipe.prepare_latents

    def prepare(*a, _orig=orig, **k):
        r = _orig(*a, **k)
        captured["latents_init"] = (r[0] if isinstance(r, tuple) else r).detach().clone()
        return r

    pipe.prepare_latents = prepare
    steps = []

    def on_step(p, i, t, kwargs, steps=steps):
        steps.append(kwargs["latents"].detach().clone())
        return kwargs

    with torch.no_grad():
        res = pipe(**kw, callback_on_step_end=on_step).images
    d = os.path.join(cases_dir, cid)
    os.makedirs(d, exist_ok=True)
    for k, im in enumerate(VaeImageProcessor.numpy_to_pil(res)):
        im.save(os.path.join(d, f"image-{k}.png"))
    save_npy(os.path.join(d, "latents_init.npy"), captured["latents_init"].numpy())
    save_npy(os.path.join(d, "step_latents.npy"), torch.stack(steps).numpy())
    sch = pipe.scheduler
    json.dump({"id": cid, "mode": mode, "model": model, "pipeline": type(pipe).__name__, "image": image, "mask_image": mask_name, "request": req,
               "scheduler": {"class": type(sch).__name__, "config": {k: v for k, v in dict(sch.config).items()}},
               "timesteps": [float(t) for t in sch.timesteps], "output": [list(r.shape[:2]) for r in res]},
              open(os.path.join(d, "case.json"), "w"), indent=1, default=str)
    print(cid, res.shape, flush=True)

# Strength 0: diffusers' img2img has no step to run (and no timestep to noise at); the runtime returns the input
# encoded (the posterior sampled with the request's generator) and decoded. This is that, with diffusers' parts.
cid, image, seed = "i2i_s000", "pic-83x69.png", 13
with torch.no_grad():
    x = ip.preprocess(load(image))
    g = torch.Generator("cpu").manual_seed(seed)
    lat = vae.encode(x).latent_dist.sample(g) * vae.config.scaling_factor
    dec = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
    res = ip.postprocess(dec, output_type="np")
d = os.path.join(cases_dir, cid)
os.makedirs(d, exist_ok=True)
VaeImageProcessor.numpy_to_pil(res)[0].save(os.path.join(d, "image-0.png"))
save_npy(os.path.join(d, "latents_init.npy"), lat.numpy())
json.dump({"id": cid, "mode": "img2img", "model": "sd", "pipeline": "VaeImageProcessor + AutoencoderKL (encode, latent_dist.sample, decode)", "image": image,
           "mask_image": None, "request": dict(prompt="anything: no denoising step runs", strength=0.0, num_inference_steps=10, guidance_scale=7.5, seed=seed),
           "output": [list(res.shape[1:3])]}, open(os.path.join(d, "case.json"), "w"), indent=1)
print(cid, res.shape)
json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "sizes": {n: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(out, n)) for f in fs)
                                                                                   for n in ("model", "inputs", "preprocess", "cases")}},
          open(os.path.join(out, "versions.json"), "w"), indent=1)
