"""Writes test/fixtures/reference/img2img/lcm-strength.json: LatentConsistencyModelImg2ImgPipeline's schedule, which
hands `strength` to LCMScheduler.set_timesteps (retrieve_timesteps(..., original_inference_steps=None,
strength=strength)) instead of cutting the full schedule as StableDiffusionImg2ImgPipeline's get_timesteps does.

    git --git-dir=<diffusers mirror> archive HEAD src/diffusers | tar x -C /tmp/diffusers-src
    PYTHONPATH=/tmp/diffusers-src/src:<huggingface_hub and its pure-Python dependencies> \
        python3 scripts/make-lcm-img2img-schedules.py test/fixtures/reference/img2img/lcm-strength.json

For each case: the timesteps set_timesteps(n, strength=strength) gives, add_noise at the first of them (what
prepare_latents noises the encoded image with), then every step with a synthetic model output and the step's noise
(`torch.Generator().manual_seed(1000 + i)`, recorded), prev_sample and denoised (the pipeline decodes the last
denoised). Cases where diffusers raises record the error's text instead. No pipeline and no weights: runs on Debian's
python3-torch 1.13 with the diffusers sources and huggingface_hub on the path.
"""
import json
import sys

import numpy as np
import torch
from parity_json import F32, dumps

import old_torch  # noqa: E402,F401 - before diffusers: stand-ins for what torch 1.13 lacks

import diffusers  # noqa: E402
from diffusers import LCMScheduler  # noqa: E402

# The demo LCM model's scheduler (src/demo/families.ts) and SimianLuo/LCM_Dreamshaper_v7's, and one distilled with
# another original_inference_steps.
DEMO = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
        "set_alpha_to_one": True, "steps_offset": 1, "timestep_spacing": "leading"}
DREAMSHAPER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
               "num_train_timesteps": 1000, "original_inference_steps": 50, "prediction_type": "epsilon",
               "set_alpha_to_one": True, "steps_offset": 1, "trained_betas": None}
ORIGINAL_30 = {**DREAMSHAPER, "original_inference_steps": 30}

CASES = [
    ("demo", DEMO, 4, 0.8), ("demo", DEMO, 4, 0.5), ("demo", DEMO, 4, 1.0), ("demo", DEMO, 2, 0.3), ("demo", DEMO, 1, 0.1),
    ("dreamshaper", DREAMSHAPER, 8, 0.75), ("dreamshaper", DREAMSHAPER, 3, 0.999), ("dreamshaper", DREAMSHAPER, 5, 0.7),
    ("original-30", ORIGINAL_30, 6, 0.35), ("original-30", ORIGINAL_30, 4, 0.6),
    # diffusers raises: int(original_inference_steps · strength) < num_inference_steps (strength 0 among them).
    ("demo", DEMO, 4, 0.05), ("demo", DEMO, 4, 0.0), ("original-30", ORIGINAL_30, 8, 0.25),
]

out = []
for k, (name, cfg, n, strength) in enumerate(CASES):
    s = LCMScheduler(**cfg)
    rec = {"config_name": name, "config": cfg, "num_inference_steps": n, "strength": strength}
    try:
        s.set_timesteps(n, original_inference_steps=None, strength=strength)
    except ValueError as e:
        rec["error"] = str(e)
        out.append(rec)
        continue
    ts = s.timesteps
    rng = np.random.default_rng(200 + k)
    shape = (1, 4, 2, 2)
    x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    latents = s.add_noise(x0, noise, ts[:1])
    rec.update({"timesteps": [int(t) for t in ts], "original": [F32(v) for v in x0.flatten().tolist()],
                "noise": [F32(v) for v in noise.flatten().tolist()], "noised": [F32(v) for v in latents.flatten().tolist()], "steps": []})
    for i, t in enumerate(ts):
        mo = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * 0.5 + 0.1 * latents).float()
        step_noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))
        r = s.step(mo, t, latents, generator=torch.Generator().manual_seed(1000 + i), return_dict=True)
        rec["steps"].append({"t": int(t), "model_output": [F32(v) for v in mo.flatten().tolist()],
                             "noise": [F32(v) for v in step_noise.flatten().tolist()],
                             "prev_sample": [F32(v) for v in r.prev_sample.flatten().tolist()],
                             "denoised": [F32(v) for v in r.denoised.flatten().tolist()]})
        latents = r.prev_sample
    out.append(rec)

with open(sys.argv[1], "w") as fh:
    fh.write(dumps({"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__, "cases": out}) + "\n")
