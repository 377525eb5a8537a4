"""Writes test/fixtures/parity/schedulers/*.json: what diffusers' own code does with a model's scheduler config.

    git --git-dir=<diffusers mirror> archive HEAD src/diffusers | tar x -C /tmp/diffusers-src
    PYTHONPATH=/tmp/diffusers-src/src python scripts/make-scheduler-parity.py test/fixtures/parity/schedulers [--only P1,P2]

`--only` writes just the cases whose names start with one of the prefixes (and not scheduler-betas.json): the cases
with `"pipeline": null` need no pipeline class, so they also run where transformers is missing (Debian's
python3-torch 1.13 with the diffusers and huggingface_hub sources on PYTHONPATH is enough for them). That is how the
unipc, deis, lms, ddpm, heun, kdpm2, dpm-sde, dpm-bounds, tcd, dpmss, edm, dpmsde, sasolver, variance, realcfg, beta and lu cases were made (test/fixtures/parity/README.md); each
file records its torch and numpy, and the test runs cases made with torch 1.x from the runtime's own betas. The dpmsde
cases (DPMSolverSDEScheduler) also need torchsde's sources and scripts/parity-shims on PYTHONPATH (a stand-in for the
`trampoline` package torchsde imports, and the package metadata diffusers looks for).

Each case writes a scheduler_config.json the way a model ships it (Python's json, so -Infinity stays -Infinity),
loads it with the model's scheduler class (`<Class>.from_pretrained`, as DiffusionPipeline.from_pretrained does),
builds the model's pipeline class around it (its __init__ applies the steps_offset / clip_sample rewrites, with a
FutureWarning; `"pipeline": None` skips that), then, when the case names a request scheduler, switches with
`<Class>.from_config(pipe.scheduler.config, **overrides)`, sets the timesteps, starts at `begin_index` where the case
cuts the schedule as image-to-image does, and replays a short trajectory with synthetic model outputs; the noise a
step draws comes from numpy and is recorded (DPMSolverSDEScheduler's comes from its own torchsde sampler, recorded as
`brownian_noise`, never replaced). Each case's seed is its position in CASES, so new cases go at the end of
their group's list to leave the committed ones reproducible. Every file has the fields of
../shared/reference/schedulers/*.json plus `model_config` (the file's text), `pipeline`, `request`, `warnings`,
`torch` and `numpy` (and `begin_index`, `eta` where set; `scipy` where the beta ramp ran). A case with `numpy_major`
is written only by a run with that numpy. Needs torch, numpy and scipy; no weights.
"""
import argparse
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import scipy
import torch
from parity_json import F32, dumps

import old_torch  # noqa: E402,F401 - before diffusers: stand-ins for what torch 1.13 lacks

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    DPMSolverSinglestepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    LMSDiscreteScheduler,
    OnnxStableDiffusionPipeline,
    PNDMScheduler,
    SASolverScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_edm_dpmsolver_multistep,
    scheduling_edm_euler,
    scheduling_dpmsolver_singlestep,
    scheduling_dpmsolver_sde,
    scheduling_euler_ancestral_discrete,
    scheduling_k_dpm_2_ancestral_discrete,
    scheduling_lcm,
    scheduling_sasolver,
    scheduling_tcd,
)

_args = argparse.ArgumentParser(description="Writes the scheduler parity cases into OUT_DIR.")
_args.add_argument("out_dir")
_args.add_argument("--only", help="comma-separated name prefixes: write just those cases (and not scheduler-betas.json)")
_opts = _args.parse_args()
out_dir = _opts.out_dir
ONLY = [p for p in _opts.only.split(",") if p] if _opts.only is not None else None
if ONLY is not None and not ONLY:
    _args.error("--only needs at least one prefix")
os.makedirs(out_dir, exist_ok=True)

CLASSES = {c.__name__: c for c in [DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler,
                                    UniPCMultistepScheduler, LMSDiscreteScheduler, DDPMScheduler, DEISMultistepScheduler,
                                    HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                                    EDMEulerScheduler, EDMDPMSolverMultistepScheduler, TCDScheduler,
                                    DPMSolverSinglestepScheduler, DPMSolverSDEScheduler, SASolverScheduler]}
# The runtime's request names (src/pipeline/schedulers/names.ts SCHEDULER_NAMES), one entry a line: the test reads
# this table and checks it matches, classes and overrides.
REQUEST = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": False}),
    "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "ddpm": ("DDPMScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "edm_euler": ("EDMEulerScheduler", {}),
    "edm_dpmpp_2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "edm_dpmpp_2m_sde": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "tcd": ("TCDScheduler", {}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2s_karras": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "sa_solver": ("SASolverScheduler", {"algorithm_type": "data_prediction"}),
    "sa_solver_karras": ("SASolverScheduler", {"algorithm_type": "data_prediction", "use_karras_sigmas": True}),
}

SD15_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "trained_betas": None}


def build_pipeline(name, scheduler):
    if name == "StableDiffusionPipeline":
        return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if name == "OnnxStableDiffusionPipeline":
        return OnnxStableDiffusionPipeline(vae_encoder=None, vae_decoder=None, text_encoder=None, tokenizer=None, unet=None, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if name == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=None,
                                         scheduler=scheduler)
    if name == "LatentConsistencyModelPipeline":
        return LatentConsistencyModelPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    raise ValueError(name)


class Noise:
    """Stands in for randn_tensor inside step(): numpy draws, recorded in order."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        x = torch.from_numpy(self.rng.standard_normal(tuple(shape)).astype(np.float32))
        self.drawn.append(as_list(x))
        return x


class RecordingBrownianSampler(scheduling_dpmsolver_sde.BrownianTreeNoiseSampler):
    """DPMSolverSDEScheduler's own noise sampler (torchsde's BrownianInterval, seeded by noise_sampler_seed), its
    draws recorded, not replaced: the runtime must make the same Brownian noise."""

    drawn = []

    def __call__(self, sigma, sigma_next):
        out = super().__call__(sigma, sigma_next)
        RecordingBrownianSampler.drawn.append(as_list(out))
        return out


scheduling_dpmsolver_sde.BrownianTreeNoiseSampler = RecordingBrownianSampler


def as_list(x):
    return None if x is None else [F32(v) for v in x.flatten().tolist()]


def exact(x):
    """float32 values written exactly (timesteps, sigmas: compared bit for bit)."""
    return None if x is None else [float(v) for v in x.flatten().tolist()]


def run_case(case):
    name = case["name"]
    cfg = case["config"]
    pipeline = case.get("pipeline", "StableDiffusionPipeline")
    request = case.get("request")
    steps = case["steps"]
    with tempfile.TemporaryDirectory() as d:
        text = json.dumps(cfg, indent=2, sort_keys=True)  # Python's json: -inf is written -Infinity
        with open(os.path.join(d, "scheduler_config.json"), "w") as fh:
            fh.write(text + "\n")
        model_cls = CLASSES[cfg["_class_name"]]
        sched = model_cls.from_pretrained(d)
    if pipeline is None:
        # The scheduler as its class loads it, no pipeline around it (so no rewrites): what the runtime does with a
        # config the pipeline's __init__ leaves as it is.
        msgs = []
        built = dict(sched.config)
        s = sched
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = build_pipeline(pipeline, sched)
        msgs = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
        built = dict(pipe.scheduler.config)
        s = pipe.scheduler
    if request is not None:
        # a class name is a request name too, with no overrides (as the runtime takes it)
        cls_name, overrides = REQUEST[request] if request in REQUEST else (request, {})
        s = CLASSES[cls_name].from_config(s.config, **overrides)
    interp = record_interpolation(s)
    s.set_timesteps(steps)
    begin = case.get("begin_index")
    if begin is not None:
        # image-to-image: the schedule cut by strength, started at begin (t_start · order, as get_timesteps gives it:
        # even for Heun and KDPM2); the pipelines call set_begin_index where the class has one (DDPM steps by the
        # timestep it is given)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
    shape = tuple(case.get("shape", (1, 4, 2, 2)))  # the schedulers are elementwise: 16 values show every path
    rng = np.random.default_rng(case.get("seed", 0))
    noise = Noise(case.get("seed", 0) + 1000)
    for mod in (scheduling_ddim, scheduling_ddpm, scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete, scheduling_lcm,
                scheduling_k_dpm_2_ancestral_discrete, scheduling_edm_dpmsolver_multistep, scheduling_edm_euler, scheduling_tcd,
                scheduling_dpmsolver_singlestep, scheduling_sasolver):
        mod.randn_tensor = noise
    sample = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * s.init_noise_sigma
    initial = sample.clone()
    eta = case.get("eta")
    record = []
    RecordingBrownianSampler.drawn = []
    for t in s.timesteps[begin or 0:]:
        scaled = s.scale_model_input(sample, t)
        mo = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        before = len(noise.drawn)
        before_brownian = len(RecordingBrownianSampler.drawn)
        kw = {"eta": eta} if eta is not None else {}
        r = s.step(mo, t, sample, **kw)
        drawn = noise.drawn[before:]
        brownian = RecordingBrownianSampler.drawn[before_brownian:]
        assert len(drawn) <= 1 and len(brownian) <= 1 and not (drawn and brownian)
        denoised = None
        if cls_is(s, (LCMScheduler,)):
            denoised = r.denoised
        if cls_is(s, (TCDScheduler,)):
            denoised = r.pred_noised_sample  # the second output, what the LCM pipeline decodes
        if cls_is(s, (LMSDiscreteScheduler, DDPMScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                      EDMEulerScheduler, DPMSolverSDEScheduler)):
            denoised = r.pred_original_sample
        record.append({
            "t": float(t),
            "scaled_input": as_list(scaled),
            "model_output": as_list(mo),
            "noise": drawn[0] if drawn else None,
            **({"brownian_noise": brownian[0]} if brownian else {}),
            "prev_sample": as_list(r.prev_sample),
            "denoised": as_list(denoised),
        })
        sample = r.prev_sample
    added = None
    if case.get("add_noise"):
        # add_noise at every index from the first kept one, as image-to-image (begin) and the inpainting blend (each
        # later one) call it: its own rng, so the trajectory's draws stay as they are
        add_rng = np.random.default_rng(case.get("seed", 0) + 2000)
        original = torch.from_numpy(add_rng.standard_normal(shape).astype(np.float32))
        add_n = torch.from_numpy(add_rng.standard_normal(shape).astype(np.float32))
        added = {"original": as_list(original), "noise": as_list(add_n),
                 "noised": [as_list(s.add_noise(original, add_n, s.timesteps[k:k + 1])) for k in range(begin or 0, len(s.timesteps))]}
    sig = getattr(s, "sigmas", None)
    resolved = {k: v for k, v in dict(s.config).items()}
    return {
        "name": name,
        "scheduler": type(s).__name__,
        "pipeline": pipeline,
        "model_config": text,
        "request": request,
        "built_config": {k: built.get(k) for k in ("steps_offset", "clip_sample", "_use_default_values") if k in built},
        "warnings": msgs,
        "config": {k: v for k, v in resolved.items() if not k.startswith("_")},
        "num_inference_steps": steps,
        **({"eta": eta} if eta is not None else {}),
        **({"begin_index": begin} if begin is not None else {}),
        "timesteps": [float(t) for t in s.timesteps],
        "sigmas": exact(sig) if sig is not None and cls_is(s, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
                                                                UniPCMultistepScheduler, LMSDiscreteScheduler, DEISMultistepScheduler,
                                                                HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                                                                EDMEulerScheduler, EDMDPMSolverMultistepScheduler,
                                                                DPMSolverSinglestepScheduler, DPMSolverSDEScheduler, SASolverScheduler)) else None,
        "init_noise_sigma": float(s.init_noise_sigma),
        "shape": list(shape),
        "initial_latents": as_list(initial),
        "steps": record,
        **({"interpolation": interp} if interp["sigma_to_t"] else {}),
        **({"add_noise": added} if added is not None else {}),
        "diffusers_version": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        # (the beta ramp's quantiles are scipy's)
        **({"scipy": scipy.__version__} if interp["convert"] is not None and interp["convert"]["kind"] == "beta" else {}),
    }


def record_interpolation(s):
    """Wraps the scheduler's own _convert_to_* and _sigma_to_t to record their inputs and outputs: with them the test
    checks that arithmetic bit for bit, whatever this machine's float32 log and torch's pow give for the tables."""
    rec = {"sigma_to_t": [], "log_sigmas": None, "convert": None}
    # (the EDM classes have a _sigma_to_t they never call, and no _convert_to_*: their ramps are checked whole)
    if not hasattr(s, "_sigma_to_t") or not hasattr(s, "_convert_to_karras"):
        return rec
    orig_t = s._sigma_to_t

    def sigma_to_t(sigma, log_sigmas):
        t = orig_t(sigma, log_sigmas)
        if isinstance(log_sigmas, torch.Tensor):
            # KDPM2's interpolated sigmas: float32 tensors all through (the test replays the whole schedule instead)
            return t
        assert log_sigmas.dtype == np.float32
        rec["log_sigmas"] = as_list(log_sigmas)
        rec["sigma_to_t"].append([float(sigma), float(np.asarray(t).reshape(-1)[0])])
        return t

    s._sigma_to_t = sigma_to_t
    for kind in ("karras", "exponential", "beta"):
        orig = getattr(s, f"_convert_to_{kind}", None)
        if orig is None:
            continue  # (no _convert_to_beta where the class has no use_beta_sigmas)

        def convert(in_sigmas, num_inference_steps=None, orig=orig, kind=kind):
            # LMS's _convert_to_karras takes no step count (it reads its own)
            own_steps = num_inference_steps is None
            if own_steps:
                num_inference_steps = s.num_inference_steps
                out = orig(in_sigmas=in_sigmas)
            else:
                out = orig(in_sigmas=in_sigmas, num_inference_steps=num_inference_steps)
            # (LMS's _convert_to_karras reads no bounds from the config, even where it carries them)
            lo = getattr(s.config, "sigma_min", None) if not own_steps else None
            hi = getattr(s.config, "sigma_max", None) if not own_steps else None
            rec["convert"] = {
                "kind": kind,
                "sigma_min": lo if lo is not None else in_sigmas[-1].item(),
                "sigma_max": hi if hi is not None else in_sigmas[0].item(),
                "n": num_inference_steps,
                "sigmas": [float(v) for v in out],
            }
            return out

        setattr(s, f"_convert_to_{kind}", convert)
    if hasattr(s, "_convert_to_lu"):
        orig_lu = s._convert_to_lu

        def convert_lu(in_lambdas, num_inference_steps):
            # DPM-Solver's use_lu_lambdas: its bounds are the ends of the (flipped, float32) log-sigma table
            out = orig_lu(in_lambdas=in_lambdas, num_inference_steps=num_inference_steps)
            rec["convert"] = {"kind": "lu", "lambda_min": in_lambdas[-1].item(), "lambda_max": in_lambdas[0].item(), "n": num_inference_steps,
                              "lambdas": [float(v) for v in out]}
            return out

        s._convert_to_lu = convert_lu
    return rec


def cls_is(s, classes):
    return isinstance(s, classes)


def nonfinite_json(v):
    return json.dumps(v, indent=1, allow_nan=True)


CASES = []
# 3. The pipeline's rewrites. A DDIM config with neither clip_sample nor steps_offset (DDIM's defaults: true, 0).
ddim_bare = {"_class_name": "DDIMScheduler", **SD15_BETAS, "set_alpha_to_one": False}
for req in [None, "ddim", "euler", "pndm", "dpmpp_2m"]:
    CASES.append({"name": f"rewrite-ddim-bare-{req or 'model'}", "config": ddim_bare, "request": req, "steps": 10})
for pipe in ["OnnxStableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline"]:
    CASES.append({"name": f"rewrite-ddim-bare-{pipe}", "config": ddim_bare, "pipeline": pipe, "steps": 10})
# Written out: steps_offset 0 and clip_sample true (not defaults, so a switch keeps the rewritten values).
ddim_explicit = {**ddim_bare, "clip_sample": True, "steps_offset": 0, "timestep_spacing": "leading"}
for req in [None, "ddim", "euler_a"]:
    CASES.append({"name": f"rewrite-ddim-explicit-{req or 'model'}", "config": ddim_explicit, "request": req, "steps": 8})
CASES.append({"name": "rewrite-ddim-explicit-eta", "config": ddim_explicit, "steps": 6, "eta": 0.7})
CASES.append({"name": "rewrite-ddim-explicit-StableDiffusionXLPipeline", "config": ddim_explicit, "pipeline": "StableDiffusionXLPipeline", "steps": 8})
# An old PNDM config without steps_offset; and the demo's SD 1.5 PNDM config (no clip_sample) switched to DDIM.
pndm_old = {"_class_name": "PNDMScheduler", **SD15_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True}
for req in [None, "ddim", "euler"]:
    CASES.append({"name": f"rewrite-pndm-no-offset-{req or 'model'}", "config": pndm_old, "request": req, "steps": 10})
pndm_sd15 = {**pndm_old, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
CASES.append({"name": "rewrite-pndm-sd15-ddim", "config": pndm_sd15, "request": "ddim", "steps": 10})
CASES.append({"name": "rewrite-pndm-sd15-clip-false-ddim", "config": {**pndm_sd15, "clip_sample": False}, "request": "ddim", "steps": 10})
# An LCM model (steps_offset 0 is LCM's default) under its own pipeline and under StableDiffusionPipeline.
lcm_cfg = {"_class_name": "LCMScheduler", **SD15_BETAS, "original_inference_steps": 50, "set_alpha_to_one": True, "steps_offset": 0, "timestep_scaling": 10.0}
CASES.append({"name": "rewrite-lcm-own-pipeline", "config": lcm_cfg, "pipeline": "LatentConsistencyModelPipeline", "steps": 4})
CASES.append({"name": "rewrite-lcm-sd-pipeline", "config": lcm_cfg, "steps": 4})

# 2. DPM-Solver as save_config writes it: lambda_min_clipped -Infinity (no clipping), and a finite one that clips.
dpm = {"_class_name": "DPMSolverMultistepScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "leading", "lambda_min_clipped": float("-inf")}
CASES.append({"name": "nonfinite-dpm-lambda-min-clipped-inf", "config": dpm, "steps": 12})
CASES.append({"name": "nonfinite-dpm-lambda-min-clipped-inf-euler", "config": dpm, "request": "euler", "steps": 12})
cos = {**dpm, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "lambda_min_clipped": -5.1}
CASES.append({"name": "nonfinite-dpm-cosine-clipped", "config": cos, "steps": 15})
CASES.append({"name": "nonfinite-dpm-cosine-unclipped", "config": {**cos, "lambda_min_clipped": float("-inf")}, "steps": 15})

# 4. Karras sigmas (and the interpolation of sigma back to t) across spacings, step counts and bounds.
euler = {"_class_name": "EulerDiscreteScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": True}
for n in [5, 10, 20, 25, 30, 50]:
    CASES.append({"name": f"karras-euler-leading-{n}", "config": euler, "steps": n})
for spacing in ["linspace", "trailing"]:
    for n in [7, 20]:
        CASES.append({"name": f"karras-euler-{spacing}-{n}", "config": {**euler, "timestep_spacing": spacing}, "steps": n})
CASES.append({"name": "karras-euler-sigma-bounds-15", "config": {**euler, "sigma_min": 0.05, "sigma_max": 10.0}, "steps": 15})
CASES.append({"name": "karras-euler-vpred-linear-12", "config": {**euler, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"}, "steps": 12})
CASES.append({"name": "karras-euler-request-sd15-pndm-25", "config": pndm_sd15, "request": "euler_karras", "steps": 25})
for n in [8, 20, 30]:
    CASES.append({"name": f"karras-dpm-{n}", "config": {**dpm, "use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}, "steps": n})
# (Karras with the cosine schedule is left out: diffusers' own step() raises IndexError there.)
CASES.append({"name": "karras-dpm-request-sd15-pndm-25", "config": pndm_sd15, "request": "dpmpp_2m_karras", "steps": 25})
# Exponential sigmas (Euler and DPM-Solver).
for n in [10, 25]:
    CASES.append({"name": f"exponential-euler-leading-{n}", "config": {**euler, "use_karras_sigmas": False, "use_exponential_sigmas": True}, "steps": n})
    CASES.append({"name": f"exponential-dpm-{n}", "config": {**dpm, "use_exponential_sigmas": True}, "steps": n})
CASES.append({"name": "exponential-euler-linspace-9", "config": {**euler, "use_karras_sigmas": False, "use_exponential_sigmas": True, "timestep_spacing": "linspace"}, "steps": 9})

# 5. UniPC and LMS, with no pipeline around them (they run where transformers is missing: see the header). A UniPC
# config as diffusers' save_config writes it, as community SD 1.5 fine-tunes ship it.
unipc = {"_class_name": "UniPCMultistepScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace", "solver_order": 2,
         "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "disable_corrector": [], "final_sigmas_type": "zero",
         "prediction_type": "epsilon", "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "solver_p": None}
for n in [1, 2, 3, 10, 20, 25]:
    CASES.append({"name": f"unipc-sd15-{n}", "config": unipc, "pipeline": None, "steps": n})
CASES.append({"name": "unipc-order1-12", "config": {**unipc, "solver_order": 1}, "pipeline": None, "steps": 12})
for n in [4, 12, 30]:
    CASES.append({"name": f"unipc-order3-{n}", "config": {**unipc, "solver_order": 3}, "pipeline": None, "steps": n})
# bh1 ends in NaN with the final sigma 0 (B(h) = h is infinite there, times a zero correction): docs/PARITY.md.
CASES.append({"name": "unipc-bh1-sigma-min-8", "config": {**unipc, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 8})
CASES.append({"name": "unipc-bh1-order3-sigma-min-10", "config": {**unipc, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 10})
CASES.append({"name": "unipc-noise-sigma-min-10", "config": {**unipc, "predict_x0": False, "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 10})
CASES.append({"name": "unipc-noise-order3-sigma-min-9", "config": {**unipc, "predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 9})
CASES.append({"name": "unipc-no-lower-order-final-sigma-min-8", "config": {**unipc, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 8})
CASES.append({"name": "unipc-disable-corrector-10", "config": {**unipc, "disable_corrector": [0, 1, 5]}, "pipeline": None, "steps": 10})
CASES.append({"name": "unipc-leading-15", "config": {**unipc, "timestep_spacing": "leading"}, "pipeline": None, "steps": 15})
vpred = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}
CASES.append({"name": "unipc-vpred-trailing-12", "config": {**unipc, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 12})
CASES.append({"name": "unipc-vpred-zero-snr-trailing-10", "config": {**unipc, **vpred, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, "pipeline": None, "steps": 10})
CASES.append({"name": "unipc-sample-linear-10", "config": {**unipc, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "pipeline": None, "steps": 10})
CASES.append({"name": "unipc-cosine-12", "config": {**unipc, "beta_schedule": "squaredcos_cap_v2"}, "pipeline": None, "steps": 12})
for n in [8, 20]:
    CASES.append({"name": f"unipc-karras-{n}", "config": {**unipc, "use_karras_sigmas": True}, "pipeline": None, "steps": n})
CASES.append({"name": "unipc-karras-sigma-min-bounds-15", "config": {**unipc, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_max": 10.0}, "pipeline": None, "steps": 15})
CASES.append({"name": "unipc-exponential-12", "config": {**unipc, "use_exponential_sigmas": True}, "pipeline": None, "steps": 12})
CASES.append({"name": "unipc-img2img-begin-6-of-20", "config": unipc, "pipeline": None, "steps": 20, "begin_index": 6})
CASES.append({"name": "unipc-img2img-begin-9-of-10", "config": unipc, "pipeline": None, "steps": 10, "begin_index": 9})
CASES.append({"name": "unipc-request-from-pndm-sd15-25", "config": pndm_sd15, "pipeline": None, "request": "unipc", "steps": 25})
CASES.append({"name": "unipc-request-from-dpm-karras-20", "config": {**dpm, "use_karras_sigmas": True, "solver_type": "midpoint"}, "pipeline": None, "request": "unipc", "steps": 20})
CASES.append({"name": "unipc-request-from-euler-vpred-10", "config": {"_class_name": "EulerDiscreteScheduler", **SD15_BETAS, "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, "pipeline": None, "request": "unipc", "steps": 10})
CASES.append({"name": "unipc-model-request-dpmpp-2m-15", "config": unipc, "pipeline": None, "request": "dpmpp_2m", "steps": 15})
CASES.append({"name": "unipc-model-request-euler-a-10", "config": unipc, "pipeline": None, "request": "euler_a", "steps": 10})
# LMS: the class CompVis' first Stable Diffusion examples ran with, and A1111's "LMS" / "LMS Karras".
lms = {"_class_name": "LMSDiscreteScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "leading"}
for n in [1, 2, 3, 4, 5, 10, 25]:
    CASES.append({"name": f"lms-sd15-leading-{n}", "config": lms, "pipeline": None, "steps": n})
CASES.append({"name": "lms-linspace-12", "config": {**lms, "timestep_spacing": "linspace"}, "pipeline": None, "steps": 12})
CASES.append({"name": "lms-vpred-trailing-10", "config": {**lms, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 10})
CASES.append({"name": "lms-sample-linear-8", "config": {**lms, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "pipeline": None, "steps": 8})
CASES.append({"name": "lms-cosine-10", "config": {**lms, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}, "pipeline": None, "steps": 10})
for n in [7, 20]:
    CASES.append({"name": f"lms-karras-{n}", "config": {**lms, "use_karras_sigmas": True}, "pipeline": None, "steps": n})
CASES.append({"name": "lms-karras-linspace-15", "config": {**lms, "use_karras_sigmas": True, "timestep_spacing": "linspace"}, "pipeline": None, "steps": 15})
CASES.append({"name": "lms-exponential-12", "config": {**lms, "use_exponential_sigmas": True}, "pipeline": None, "steps": 12})
CASES.append({"name": "lms-img2img-begin-7-of-20", "config": lms, "pipeline": None, "steps": 20, "begin_index": 7})
CASES.append({"name": "lms-img2img-begin-2-of-10", "config": lms, "pipeline": None, "steps": 10, "begin_index": 2})
CASES.append({"name": "lms-request-from-pndm-sd15-20", "config": pndm_sd15, "pipeline": None, "request": "lms", "steps": 20})
CASES.append({"name": "lms-request-karras-from-pndm-sd15-20", "config": pndm_sd15, "pipeline": None, "request": "lms_karras", "steps": 20})
CASES.append({"name": "lms-request-from-euler-karras-15", "config": euler, "pipeline": None, "request": "lms", "steps": 15})
CASES.append({"name": "lms-model-request-unipc-10", "config": lms, "pipeline": None, "request": "unipc", "steps": 10})
CASES.append({"name": "lms-request-karras-from-pndm-sd15-1", "config": pndm_sd15, "pipeline": None, "request": "lms_karras", "steps": 1})
CASES.append({"name": "unipc-karras-1", "config": {**unipc, "use_karras_sigmas": True}, "pipeline": None, "steps": 1})
# LMS's exponential ramp takes sigma_min / sigma_max from its config though its __init__ has neither: a file's own
# keys, or an Euler config's carried over by from_config (hidden keys). Its Karras ramp ignores them.
lms_bounds = {"sigma_min": 0.1, "sigma_max": 8.0}
CASES.append({"name": "lms-exponential-bounds-own-12", "config": {**lms, "use_exponential_sigmas": True, **lms_bounds}, "pipeline": None, "steps": 12})
CASES.append({"name": "lms-exponential-bounds-from-euler-12", "config": {**euler, "use_karras_sigmas": False, "use_exponential_sigmas": True, **lms_bounds}, "pipeline": None, "request": "lms", "steps": 12})
CASES.append({"name": "lms-exponential-bounds-karras-from-euler-12", "config": {**euler, **lms_bounds}, "pipeline": None, "request": "lms_karras", "steps": 12})
# DPM-Solver's Karras and exponential ramps read the same hidden keys.
CASES.append({"name": "dpm-bounds-karras-from-euler-12", "config": {**euler, **lms_bounds}, "pipeline": None, "request": "dpmpp_2m_karras", "steps": 12})
CASES.append({"name": "dpm-bounds-exponential-own-12", "config": {**dpm, "use_exponential_sigmas": True, **lms_bounds}, "pipeline": None, "steps": 12})
# DDPM, as DreamBooth fine-tunes saved by some training scripts ship it (github.com/jartemio/The_Owl_Characters_V2).
ddpm = {"_class_name": "DDPMScheduler", **SD15_BETAS, "clip_sample": False, "clip_sample_range": 1.0, "prediction_type": "epsilon",
        "set_alpha_to_one": False, "steps_offset": 1, "variance_type": "fixed_small"}
for n in [1, 2, 10, 25]:
    CASES.append({"name": f"ddpm-dreambooth-{n}", "config": ddpm, "pipeline": None, "steps": n})
CASES.append({"name": "ddpm-linspace-8", "config": {**ddpm, "timestep_spacing": "linspace"}, "pipeline": None, "steps": 8})
CASES.append({"name": "ddpm-trailing-vpred-zero-snr-6", "config": {**ddpm, **vpred, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, "pipeline": None, "steps": 6})
CASES.append({"name": "ddpm-clip-sample-10", "config": {**ddpm, "clip_sample": True, "clip_sample_range": 0.8}, "pipeline": None, "steps": 10})
CASES.append({"name": "ddpm-sample-linear-7", "config": {**ddpm, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "pipeline": None, "steps": 7})
CASES.append({"name": "ddpm-small-log-9", "config": {**ddpm, "variance_type": "fixed_small_log"}, "pipeline": None, "steps": 9})
CASES.append({"name": "ddpm-large-9", "config": {**ddpm, "variance_type": "fixed_large"}, "pipeline": None, "steps": 9})
CASES.append({"name": "ddpm-cosine-10", "config": {**ddpm, "beta_schedule": "squaredcos_cap_v2"}, "pipeline": None, "steps": 10})
CASES.append({"name": "ddpm-img2img-begin-4-of-12", "config": ddpm, "pipeline": None, "steps": 12, "begin_index": 4})
CASES.append({"name": "ddpm-request-from-pndm-sd15-12", "config": pndm_sd15, "pipeline": None, "request": "ddpm", "steps": 12})
CASES.append({"name": "ddpm-model-request-unipc-10", "config": ddpm, "pipeline": None, "request": "unipc", "steps": 10})
# DEIS, which DreamShaper 8's model card runs (DEISMultistepScheduler.from_config(pipe.scheduler.config)).
deis = {"_class_name": "DEISMultistepScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace", "solver_order": 2}
for n in [1, 2, 3, 10, 14, 15, 25]:
    CASES.append({"name": f"deis-sd15-{n}", "config": deis, "pipeline": None, "steps": n})
for n in [3, 4, 12, 20]:
    CASES.append({"name": f"deis-order3-{n}", "config": {**deis, "solver_order": 3}, "pipeline": None, "steps": n})
CASES.append({"name": "deis-order1-8", "config": {**deis, "solver_order": 1}, "pipeline": None, "steps": 8})
CASES.append({"name": "deis-no-lower-order-final-10", "config": {**deis, "lower_order_final": False}, "pipeline": None, "steps": 10})
CASES.append({"name": "deis-leading-12", "config": {**deis, "timestep_spacing": "leading"}, "pipeline": None, "steps": 12})
CASES.append({"name": "deis-vpred-trailing-10", "config": {**deis, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 10})
CASES.append({"name": "deis-sample-linear-9", "config": {**deis, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "pipeline": None, "steps": 9})
CASES.append({"name": "deis-cosine-12", "config": {**deis, "beta_schedule": "squaredcos_cap_v2"}, "pipeline": None, "steps": 12})
for n in [1, 8, 20]:
    CASES.append({"name": f"deis-karras-{n}", "config": {**deis, "use_karras_sigmas": True}, "pipeline": None, "steps": n})
CASES.append({"name": "deis-exponential-12", "config": {**deis, "use_exponential_sigmas": True}, "pipeline": None, "steps": 12})
CASES.append({"name": "deis-img2img-begin-5-of-20", "config": deis, "pipeline": None, "steps": 20, "begin_index": 5})
CASES.append({"name": "deis-order3-img2img-begin-3-of-12", "config": {**deis, "solver_order": 3}, "pipeline": None, "steps": 12, "begin_index": 3})
CASES.append({"name": "deis-request-from-pndm-sd15-25", "config": pndm_sd15, "pipeline": None, "request": "deis", "steps": 25})
CASES.append({"name": "deis-request-from-dpm-karras-20", "config": {**dpm, "use_karras_sigmas": True}, "pipeline": None, "request": "deis", "steps": 20})
CASES.append({"name": "deis-request-from-unipc-bh1-12", "config": {**unipc, "solver_type": "bh1"}, "pipeline": None, "request": "deis", "steps": 12})
CASES.append({"name": "deis-model-request-dpmpp-2m-15", "config": deis, "pipeline": None, "request": "dpmpp_2m", "steps": 15})
CASES.append({"name": "deis-model-request-unipc-15", "config": deis, "pipeline": None, "request": "unipc", "steps": 15})
# DPM-Solver's SDE variants (A1111's "DPM++ 2M SDE" and "... Karras"): fresh noise on every step.
for n in [1, 2, 10, 14, 25]:
    CASES.append({"name": f"dpm-sde-request-from-pndm-sd15-{n}", "config": pndm_sd15, "pipeline": None, "request": "dpmpp_2m_sde", "steps": n})
CASES.append({"name": "dpm-sde-karras-request-from-pndm-sd15-20", "config": pndm_sd15, "pipeline": None, "request": "dpmpp_2m_sde_karras", "steps": 20})
sde = {**dpm, "algorithm_type": "sde-dpmsolver++"}
CASES.append({"name": "dpm-sde-heun-12", "config": {**sde, "solver_type": "heun"}, "pipeline": None, "steps": 12})
CASES.append({"name": "dpm-sde-order1-8", "config": {**sde, "solver_order": 1}, "pipeline": None, "steps": 8})
CASES.append({"name": "dpm-sde-vpred-trailing-sigma-min-10", "config": {**sde, **vpred, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 10})
CASES.append({"name": "dpm-sde-exponential-12", "config": {**sde, "use_exponential_sigmas": True}, "pipeline": None, "steps": 12})
CASES.append({"name": "dpm-sde-img2img-begin-6-of-20", "config": sde, "pipeline": None, "steps": 20, "begin_index": 6})
sde_old = {**dpm, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}
CASES.append({"name": "dpm-sde-plain-midpoint-10", "config": sde_old, "pipeline": None, "steps": 10})
CASES.append({"name": "dpm-sde-plain-heun-10", "config": {**sde_old, "solver_type": "heun"}, "pipeline": None, "steps": 10})
# DEIS's Karras and exponential ramps read the same hidden keys.
CASES.append({"name": "deis-bounds-karras-from-euler-12", "config": {**euler, **lms_bounds}, "pipeline": None, "request": "deis", "steps": 12})
CASES.append({"name": "deis-bounds-exponential-own-12", "config": {**deis, "use_exponential_sigmas": True, **lms_bounds}, "pipeline": None, "steps": 12})

# Heun: two UNet runs per step (order 2); image-to-image starts at t_start·2.
heun = {"_class_name": "HeunDiscreteScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace"}
for n in [1, 2, 3, 10, 25]:
    CASES.append({"name": f"heun-sd15-{n}", "config": heun, "pipeline": None, "steps": n})
CASES.append({"name": "heun-leading-8", "config": {**heun, "timestep_spacing": "leading"}, "pipeline": None, "steps": 8})
CASES.append({"name": "heun-vpred-trailing-8", "config": {**heun, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 8})
CASES.append({"name": "heun-sample-clip-7", "config": {**heun, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.9}, "pipeline": None, "steps": 7})
CASES.append({"name": "heun-karras-12", "config": {**heun, "use_karras_sigmas": True}, "pipeline": None, "steps": 12})
CASES.append({"name": "heun-exponential-9", "config": {**heun, "use_exponential_sigmas": True}, "pipeline": None, "steps": 9})
CASES.append({"name": "heun-img2img-begin-8-of-10", "config": heun, "pipeline": None, "steps": 10, "begin_index": 8})
CASES.append({"name": "heun-img2img-begin-2-of-6", "config": heun, "pipeline": None, "steps": 6, "begin_index": 2})
CASES.append({"name": "heun-request-from-pndm-sd15-12", "config": pndm_sd15, "pipeline": None, "request": "heun", "steps": 12})
CASES.append({"name": "heun-request-bounds-from-euler-10", "config": {**euler, **lms_bounds}, "pipeline": None, "request": "heun", "steps": 10})
CASES.append({"name": "heun-model-request-euler-a-10", "config": heun, "pipeline": None, "request": "euler_a", "steps": 10})

# KDPM2 and KDPM2 ancestral (A1111's DPM2 and DPM2 a): a half step to an interpolated sigma, then the full step.
kdpm2 = {"_class_name": "KDPM2DiscreteScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace"}
kdpm2a = {**kdpm2, "_class_name": "KDPM2AncestralDiscreteScheduler"}
for cfg, tag in [(kdpm2, "kdpm2"), (kdpm2a, "kdpm2a")]:
    for n in [1, 2, 3, 10, 25]:
        CASES.append({"name": f"{tag}-sd15-{n}", "config": cfg, "pipeline": None, "steps": n})
    CASES.append({"name": f"{tag}-leading-8", "config": {**cfg, "timestep_spacing": "leading"}, "pipeline": None, "steps": 8})
    CASES.append({"name": f"{tag}-vpred-trailing-8", "config": {**cfg, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 8})
    CASES.append({"name": f"{tag}-karras-12", "config": {**cfg, "use_karras_sigmas": True}, "pipeline": None, "steps": 12})
    CASES.append({"name": f"{tag}-exponential-9", "config": {**cfg, "use_exponential_sigmas": True}, "pipeline": None, "steps": 9})
    CASES.append({"name": f"{tag}-img2img-begin-6-of-10", "config": cfg, "pipeline": None, "steps": 10, "begin_index": 6})
    CASES.append({"name": f"{tag}-request-bounds-from-euler-10", "config": {**euler, **lms_bounds}, "pipeline": None, "request": "dpm2_karras" if tag == "kdpm2" else "dpm2_a_karras", "steps": 10})
CASES.append({"name": "kdpm2-request-from-pndm-sd15-12", "config": pndm_sd15, "pipeline": None, "request": "dpm2", "steps": 12})
CASES.append({"name": "kdpm2a-request-from-pndm-sd15-12", "config": pndm_sd15, "pipeline": None, "request": "dpm2_a", "steps": 12})

# DPM-Solver order 3: dpmsolver++, dpmsolver and sde-dpmsolver++ (A1111's DPM++ 3M SDE), around the 15-step limit of
# lower_order_final (below it the last two steps drop to orders 1 and 2).
for n in [3, 4, 10, 14, 15, 30]:
    CASES.append({"name": f"dpm3-plusplus-{n}", "config": {**dpm, "solver_order": 3}, "pipeline": None, "steps": n})
CASES.append({"name": "dpm3-plain-sigma-min-20", "config": {**dpm, "solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "pipeline": None, "steps": 20})
CASES.append({"name": "dpm3-plusplus-vpred-trailing-16", "config": {**dpm, **vpred, "solver_order": 3, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 16})
CASES.append({"name": "dpm3-plusplus-karras-25", "config": {**dpm, "solver_order": 3, "use_karras_sigmas": True}, "pipeline": None, "steps": 25})
CASES.append({"name": "dpm3-plusplus-img2img-begin-5-of-20", "config": {**dpm, "solver_order": 3}, "pipeline": None, "steps": 20, "begin_index": 5})
for n in [3, 12, 20]:
    CASES.append({"name": f"dpm3-sde-request-from-pndm-sd15-{n}", "config": pndm_sd15, "pipeline": None, "request": "dpmpp_3m_sde", "steps": n})
CASES.append({"name": "dpm3-sde-karras-request-from-pndm-sd15-25", "config": pndm_sd15, "pipeline": None, "request": "dpmpp_3m_sde_karras", "steps": 25})

# EDM (Playground v2.5): sigmas from sigma_min/sigma_max, c_noise timesteps, c_in / c_skip / c_out preconditioning.
# Explicit seeds (9000 on), so cases added elsewhere in the list leave these files as they are.
edm_dpm = {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "prediction_type": "epsilon",
           "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero", "lower_order_final": True,
           "euler_at_final": False, "num_train_timesteps": 1000, "rho": 7.0, "sigma_schedule": "karras", "thresholding": False}
edm_euler = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "prediction_type": "epsilon"}
EDM_CASES = []
for n in [1, 2, 3, 10, 15, 16, 25, 50]:
    EDM_CASES.append({"name": f"edm-dpm-{n}", "config": edm_dpm, "steps": n})
for n in [1, 2, 10, 17, 30]:
    EDM_CASES.append({"name": f"edm-euler-{n}", "config": edm_euler, "steps": n})
EDM_CASES += [
    {"name": "edm-dpm-sde-12", "config": {**edm_dpm, "algorithm_type": "sde-dpmsolver++"}, "steps": 12},
    {"name": "edm-dpm-sde-heun-20", "config": {**edm_dpm, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "steps": 20},
    {"name": "edm-dpm-heun-20", "config": {**edm_dpm, "solver_type": "heun"}, "steps": 20},
    {"name": "edm-dpm-order3-20", "config": {**edm_dpm, "solver_order": 3}, "steps": 20},
    {"name": "edm-dpm-order1-8", "config": {**edm_dpm, "solver_order": 1}, "steps": 8},
    {"name": "edm-dpm-sigma-min-14", "config": {**edm_dpm, "final_sigmas_type": "sigma_min"}, "steps": 14},
    {"name": "edm-dpm-euler-at-final-20", "config": {**edm_dpm, "euler_at_final": True}, "steps": 20},
    {"name": "edm-dpm-exponential-24", "config": {**edm_dpm, "sigma_schedule": "exponential"}, "steps": 24},
    {"name": "edm-dpm-vpred-18", "config": {**edm_dpm, "prediction_type": "v_prediction"}, "steps": 18},
    {"name": "edm-dpm-sigma-data-1-rho-5-12", "config": {**edm_dpm, "sigma_data": 1.0, "rho": 5.0, "sigma_max": 120.0}, "steps": 12},
    {"name": "edm-dpm-img2img-begin-6-of-20", "config": edm_dpm, "steps": 20, "begin_index": 6},
    {"name": "edm-euler-vpred-12", "config": {**edm_euler, "prediction_type": "v_prediction"}, "steps": 12},
    {"name": "edm-euler-exponential-16", "config": {**edm_euler, "sigma_schedule": "exponential"}, "steps": 16},
    {"name": "edm-euler-sigma-min-9", "config": {**edm_euler, "final_sigmas_type": "sigma_min"}, "steps": 9},
    {"name": "edm-euler-img2img-begin-4-of-10", "config": edm_euler, "steps": 10, "begin_index": 4},
    {"name": "edm-request-euler-from-dpm-20", "config": edm_dpm, "request": "edm_euler", "steps": 20},
    {"name": "edm-request-dpm-from-euler-20", "config": edm_euler, "request": "edm_dpmpp_2m", "steps": 20},
    {"name": "edm-request-dpm-sde-from-dpm-order3-25", "config": {**edm_dpm, "solver_order": 3}, "request": "edm_dpmpp_2m_sde", "steps": 25},
]
for k, case in enumerate(EDM_CASES):
    case.setdefault("pipeline", None)
    case["seed"] = 9000 + k
CASES += EDM_CASES

# TCDScheduler (request name tcd; the TCD LoRAs' sampler). Every case gives eta: the Stable Diffusion pipelines pass
# their own eta (default 0) to a step that takes one, where step()'s own default would be 0.3. Seeds 6000 on.
tcd = {"_class_name": "TCDScheduler", **SD15_BETAS, "original_inference_steps": 50, "clip_sample": False, "set_alpha_to_one": True,
       "steps_offset": 0, "prediction_type": "epsilon", "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False}
sdxl_euler = {"_class_name": "EulerDiscreteScheduler", **SD15_BETAS, "clip_sample": False, "interpolation_type": "linear", "prediction_type": "epsilon",
              "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
              "use_karras_sigmas": False}
_tcd = []
for n in [1, 2, 4, 8]:
    for eta in [0.0, 0.3]:
        _tcd.append({"name": f"tcd-sd15-{n}-eta-{eta:g}", "config": tcd, "steps": n, "eta": eta})
for n in [4, 8]:
    _tcd.append({"name": f"tcd-sd15-{n}-eta-1", "config": tcd, "steps": n, "eta": 1.0})
_tcd.append({"name": "tcd-sd15-6-eta-0.5", "config": tcd, "steps": 6, "eta": 0.5})
_tcd.append({"name": "tcd-sd15-50-eta-0.3", "config": tcd, "steps": 50, "eta": 0.3})
_tcd.append({"name": "tcd-original-100-8-eta-0.3", "config": {**tcd, "original_inference_steps": 100}, "steps": 8, "eta": 0.3})
# 0.1 as float32 times 890, floored, is 89 in torch; float64 arithmetic would give 88.
_tcd.append({"name": "tcd-original-30-8-eta-0.9", "config": {**tcd, "original_inference_steps": 30}, "steps": 8, "eta": 0.9})
_tcd.append({"name": "tcd-original-1000-10-eta-0.3", "config": {**tcd, "original_inference_steps": 1000}, "steps": 10, "eta": 0.3})
_tcd.append({"name": "tcd-original-12-12-eta-0.3", "config": {**tcd, "original_inference_steps": 12}, "steps": 12, "eta": 0.3})
_tcd.append({"name": "tcd-vpred-4-eta-0.3", "config": {**tcd, **vpred}, "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-vpred-zero-snr-4-eta-0.3", "config": {**tcd, **vpred, "rescale_betas_zero_snr": True}, "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-sample-linear-6-eta-0.3", "config": {**tcd, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "steps": 6, "eta": 0.3})
_tcd.append({"name": "tcd-cosine-6-eta-0.3", "config": {**tcd, "beta_schedule": "squaredcos_cap_v2"}, "steps": 6, "eta": 0.3})
# Options TCD's step never reads (diffusers' neither): clip_sample, thresholding, set_alpha_to_one, timestep_scaling.
_tcd.append({"name": "tcd-unread-options-4-eta-0.3", "config": {**tcd, "clip_sample": True, "clip_sample_range": 0.5, "thresholding": True,
                                                                 "set_alpha_to_one": False, "timestep_scaling": 3.0, "steps_offset": 1}, "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-img2img-begin-2-of-8-eta-0.3", "config": tcd, "steps": 8, "begin_index": 2, "eta": 0.3})
_tcd.append({"name": "tcd-img2img-begin-3-of-4-eta-0.3", "config": tcd, "steps": 4, "begin_index": 3, "eta": 0.3})
_tcd.append({"name": "tcd-img2img-begin-4-of-8-eta-0", "config": tcd, "steps": 8, "begin_index": 4, "eta": 0.0})
_tcd.append({"name": "tcd-request-from-pndm-sd15-4-eta-0.3", "config": pndm_sd15, "request": "tcd", "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-request-from-pndm-sd15-8-eta-0", "config": pndm_sd15, "request": "tcd", "steps": 8, "eta": 0.0})
_tcd.append({"name": "tcd-request-from-sdxl-euler-4-eta-0.3", "config": sdxl_euler, "request": "tcd", "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-request-from-sdxl-euler-1-eta-0", "config": sdxl_euler, "request": "tcd", "steps": 1, "eta": 0.0})
_tcd.append({"name": "tcd-request-from-sd2-euler-vpred-4-eta-0.3", "config": {**sdxl_euler, **vpred}, "request": "tcd", "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-request-from-lcm-4-eta-0.3", "config": lcm_cfg, "request": "tcd", "steps": 4, "eta": 0.3})
_tcd.append({"name": "tcd-model-request-lcm-4", "config": tcd, "request": "lcm", "steps": 4})
for _i, _c in enumerate(_tcd):
    CASES.append({**_c, "pipeline": None, "seed": 6000 + _i})

# DPM-Solver singlestep (request names dpmpp_2s, dpmpp_2s_karras; not A1111's ancestral "DPM++ 2S a"): each group of
# orders 1, 2[, 3] from get_order_list steps from the sample at its start. Its defaults (lower_order_final false,
# final sigma 0) end every schedule in a shortened group; uneven and tiny step counts shorten it further.
dpmss = {"_class_name": "DPMSolverSinglestepScheduler", **SD15_BETAS}
dpmss_cases = []
for n in [1, 2, 3, 4, 5, 7, 10]:
    dpmss_cases.append({"name": f"dpmss-order2-{n}", "config": dpmss, "steps": n})
for n in [1, 2, 3, 4, 5, 7, 12]:
    dpmss_cases.append({"name": f"dpmss-order3-{n}", "config": {**dpmss, "solver_order": 3}, "steps": n})
dpmss_cases.append({"name": "dpmss-order1-6", "config": {**dpmss, "solver_order": 1}, "steps": 6})
# lower_order_final stays off only with sigma_min and a step count the order divides: full groups to the end.
dpmss_min = {**dpmss, "final_sigmas_type": "sigma_min"}
dpmss_cases.append({"name": "dpmss-sigma-min-no-lower-final-8", "config": dpmss_min, "steps": 8})
dpmss_cases.append({"name": "dpmss-order3-sigma-min-no-lower-final-9", "config": {**dpmss_min, "solver_order": 3}, "steps": 9})
dpmss_cases.append({"name": "dpmss-sigma-min-lower-final-8", "config": {**dpmss_min, "lower_order_final": True}, "steps": 8})
dpmss_cases.append({"name": "dpmss-plain-sigma-min-9", "config": {**dpmss_min, "algorithm_type": "dpmsolver"}, "steps": 9})
dpmss_cases.append({"name": "dpmss-plain-order3-heun-sigma-min-10", "config": {**dpmss_min, "algorithm_type": "dpmsolver", "solver_order": 3, "solver_type": "heun"}, "steps": 10})
dpmss_cases.append({"name": "dpmss-heun-10", "config": {**dpmss, "solver_type": "heun"}, "steps": 10})
dpmss_cases.append({"name": "dpmss-order3-heun-12", "config": {**dpmss, "solver_order": 3, "solver_type": "heun"}, "steps": 12})
dpmss_cases.append({"name": "dpmss-sde-10", "config": {**dpmss, "algorithm_type": "sde-dpmsolver++"}, "steps": 10})
dpmss_cases.append({"name": "dpmss-sde-order3-heun-9", "config": {**dpmss, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, "steps": 9})
dpmss_cases.append({"name": "dpmss-sde-order3-11", "config": {**dpmss, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "steps": 11})
dpmss_cases.append({"name": "dpmss-karras-15", "config": {**dpmss, "use_karras_sigmas": True}, "steps": 15})
dpmss_cases.append({"name": "dpmss-order3-karras-sigma-min-12", "config": {**dpmss_min, "solver_order": 3, "use_karras_sigmas": True}, "steps": 12})
dpmss_cases.append({"name": "dpmss-exponential-10", "config": {**dpmss, "use_exponential_sigmas": True}, "steps": 10})
# The class has no timestep_spacing: a v-prediction config's "trailing" is dropped (linspace timesteps).
dpmss_cases.append({"name": "dpmss-vpred-trailing-9", "config": {**dpmss, **vpred, "timestep_spacing": "trailing"}, "steps": 9})
dpmss_cases.append({"name": "dpmss-sample-linear-8", "config": {**dpmss, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "steps": 8})
dpmss_cases.append({"name": "dpmss-cosine-clipped-12", "config": {**dpmss, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, "steps": 12})
# Image-to-image starts inside a group (order 1 here, so at t_start): its first steps drop to the orders they can take.
dpmss_cases.append({"name": "dpmss-img2img-begin-3-of-10", "config": dpmss, "steps": 10, "begin_index": 3})
dpmss_cases.append({"name": "dpmss-order3-img2img-begin-4-of-12", "config": {**dpmss, "solver_order": 3}, "steps": 12, "begin_index": 4})
dpmss_cases.append({"name": "dpmss-order3-img2img-begin-5-of-12", "config": {**dpmss, "solver_order": 3}, "steps": 12, "begin_index": 5})
for n in [7, 20]:
    dpmss_cases.append({"name": f"dpmss-request-from-pndm-sd15-{n}", "config": pndm_sd15, "request": "dpmpp_2s", "steps": n})
for n in [3, 20]:
    dpmss_cases.append({"name": f"dpmss-karras-request-from-pndm-sd15-{n}", "config": pndm_sd15, "request": "dpmpp_2s_karras", "steps": n})
dpmss_cases.append({"name": "dpmss-request-bounds-from-euler-10", "config": {**euler, **lms_bounds}, "request": "dpmpp_2s_karras", "steps": 10})
dpmss_cases.append({"name": "dpmss-request-from-deis-12", "config": deis, "request": "dpmpp_2s", "steps": 12})
dpmss_cases.append({"name": "dpmss-model-request-dpmpp-2m-10", "config": dpmss, "request": "dpmpp_2m", "steps": 10})
for seed, case in enumerate(dpmss_cases, start=5000):
    CASES.append({**case, "pipeline": None, "seed": seed})

# DPMSolverSDE (A1111's DPM++ SDE / DPM++ SDE Karras): two UNet runs per step but the last, its noise from torchsde's
# Brownian tree seeded by noise_sampler_seed (the only reproducible setting in diffusers; a list is one tree per image).
dpmsde = {"_class_name": "DPMSolverSDEScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace", "noise_sampler_seed": 7000}
for k, n in enumerate([1, 2, 5, 10, 25]):
    CASES.append({"name": f"dpmsde-sd15-{n}", "config": {**dpmsde, "noise_sampler_seed": 7000 + k}, "pipeline": None, "steps": n, "seed": 7000 + k})
CASES.append({"name": "dpmsde-linspace-20", "config": dpmsde, "pipeline": None, "steps": 20, "seed": 7005})
CASES.append({"name": "dpmsde-leading-10", "config": {**dpmsde, "timestep_spacing": "leading"}, "pipeline": None, "steps": 10, "seed": 7006})
CASES.append({"name": "dpmsde-vpred-trailing-8", "config": {**dpmsde, **vpred, "timestep_spacing": "trailing"}, "pipeline": None, "steps": 8, "seed": 7007})
CASES.append({"name": "dpmsde-karras-12", "config": {**dpmsde, "use_karras_sigmas": True}, "pipeline": None, "steps": 12, "seed": 7008})
CASES.append({"name": "dpmsde-exponential-9", "config": {**dpmsde, "use_exponential_sigmas": True}, "pipeline": None, "steps": 9, "seed": 7009})
CASES.append({"name": "dpmsde-img2img-begin-6-of-10", "config": dpmsde, "pipeline": None, "steps": 10, "begin_index": 6, "seed": 7010})
CASES.append({"name": "dpmsde-8x8-10", "config": {**dpmsde, "noise_sampler_seed": 7011}, "pipeline": None, "steps": 10, "shape": (1, 4, 8, 8), "seed": 7011})
CASES.append({"name": "dpmsde-batch2-list-seeds-8x8-6", "config": {**dpmsde, "noise_sampler_seed": [7012, 7013]}, "pipeline": None, "steps": 6,
              "shape": (2, 4, 8, 8), "seed": 7012})
CASES.append({"name": "dpmsde-seed-above-32-bits-10", "config": {**dpmsde, "noise_sampler_seed": 2**40 + 7}, "pipeline": None, "steps": 10, "seed": 7013})
CASES.append({"name": "dpmsde-request-from-pndm-sd15-20", "config": {**pndm_sd15, "noise_sampler_seed": 7014}, "pipeline": None, "request": "dpmpp_sde",
              "steps": 20, "seed": 7014})
CASES.append({"name": "dpmsde-karras-request-from-pndm-sd15-15", "config": {**pndm_sd15, "noise_sampler_seed": 7015}, "pipeline": None,
              "request": "dpmpp_sde_karras", "steps": 15, "seed": 7015})
CASES.append({"name": "dpmsde-karras-request-bounds-from-euler-10", "config": {**euler, **lms_bounds, "noise_sampler_seed": 7016}, "pipeline": None,
              "request": "dpmpp_sde_karras", "steps": 10, "seed": 7016})
CASES.append({"name": "dpmsde-exponential-bounds-own-12", "config": {**dpmsde, "use_exponential_sigmas": True, **lms_bounds}, "pipeline": None,
              "steps": 12, "seed": 7017})
# Beta sigmas (use_beta_sigmas: scipy's beta.ppf at 0.6, 0.6), the config's own bounds or the schedule's ends.
CASES.append({"name": "dpmsde-beta-12", "config": {**dpmsde, "use_beta_sigmas": True}, "pipeline": None, "steps": 12, "seed": 7018})
CASES.append({"name": "dpmsde-beta-bounds-own-10", "config": {**dpmsde, "use_beta_sigmas": True, **lms_bounds}, "pipeline": None, "steps": 10, "seed": 7019})
CASES.append({"name": "dpmsde-beta-request-from-euler-beta-15", "config": {**euler, "use_karras_sigmas": False, "use_beta_sigmas": True, "noise_sampler_seed": 7020},
              "pipeline": None, "request": "dpmpp_sde", "steps": 15, "seed": 7020})

# SA-Solver (SASolverScheduler; request names sa_solver, sa_solver_karras): a stochastic predictor and corrector
# with diffusers' default tau (1 for timesteps 200-800, else 0) and a draw on every step, tau 0 or not. Each case also
# records add_noise at every index from its first (image-to-image and the inpainting blend). Seeds 8000 on.
sa = {"_class_name": "SASolverScheduler", **SD15_BETAS, "steps_offset": 1, "timestep_spacing": "linspace"}
sa_cases = []
for n in [1, 2, 3, 10, 20, 25]:
    sa_cases.append({"name": f"sasolver-sd15-{n}", "config": sa, "steps": n})
for p_, c_ in [(1, 1), (3, 3), (4, 4), (3, 2), (2, 4), (1, 3), (4, 1)]:
    sa_cases.append({"name": f"sasolver-p{p_}-c{c_}-14", "config": {**sa, "predictor_order": p_, "corrector_order": c_}, "steps": 14})
sa_cases.append({"name": "sasolver-p4-c4-5", "config": {**sa, "predictor_order": 4, "corrector_order": 4}, "steps": 5})
sa_cases.append({"name": "sasolver-noise-12", "config": {**sa, "algorithm_type": "noise_prediction"}, "steps": 12})
for p_, c_ in [(1, 1), (3, 3), (4, 4), (2, 4)]:
    sa_cases.append({"name": f"sasolver-noise-p{p_}-c{c_}-12", "config": {**sa, "algorithm_type": "noise_prediction", "predictor_order": p_, "corrector_order": c_}, "steps": 12})
sa_cases.append({"name": "sasolver-no-lower-order-final-10", "config": {**sa, "lower_order_final": False}, "steps": 10})
sa_cases.append({"name": "sasolver-p3-c4-no-lower-order-final-9", "config": {**sa, "lower_order_final": False, "predictor_order": 3, "corrector_order": 4}, "steps": 9})
sa_cases.append({"name": "sasolver-leading-12", "config": {**sa, "timestep_spacing": "leading"}, "steps": 12})
sa_cases.append({"name": "sasolver-vpred-trailing-10", "config": {**sa, **vpred, "timestep_spacing": "trailing"}, "steps": 10})
sa_cases.append({"name": "sasolver-noise-vpred-trailing-10", "config": {**sa, **vpred, "timestep_spacing": "trailing", "algorithm_type": "noise_prediction"}, "steps": 10})
sa_cases.append({"name": "sasolver-sample-linear-9", "config": {**sa, "prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "steps": 9})
sa_cases.append({"name": "sasolver-noise-sample-linear-9", "config": {**sa, "prediction_type": "sample", "algorithm_type": "noise_prediction", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "steps": 9})
sa_cases.append({"name": "sasolver-cosine-clipped-12", "config": {**sa, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, "steps": 12})
for n in [1, 12, 20]:
    sa_cases.append({"name": f"sasolver-karras-{n}", "config": {**sa, "use_karras_sigmas": True}, "steps": n})
# The Karras ramp ends on a repeated sigma: with lower_order_final off the last step is second order over h = 0.
sa_cases.append({"name": "sasolver-karras-no-lower-order-final-10", "config": {**sa, "use_karras_sigmas": True, "lower_order_final": False}, "steps": 10})
sa_cases.append({"name": "sasolver-exponential-12", "config": {**sa, "use_exponential_sigmas": True}, "steps": 12})
sa_cases.append({"name": "sasolver-karras-bounds-own-12", "config": {**sa, "use_karras_sigmas": True, **lms_bounds}, "steps": 12})
sa_cases.append({"name": "sasolver-img2img-begin-6-of-20", "config": sa, "steps": 20, "begin_index": 6})
sa_cases.append({"name": "sasolver-img2img-begin-9-of-10", "config": sa, "steps": 10, "begin_index": 9})
sa_cases.append({"name": "sasolver-p3-c4-img2img-begin-3-of-12", "config": {**sa, "predictor_order": 3, "corrector_order": 4}, "steps": 12, "begin_index": 3})
sa_cases.append({"name": "sasolver-karras-img2img-begin-4-of-12", "config": {**sa, "use_karras_sigmas": True}, "steps": 12, "begin_index": 4})
for n in [10, 25]:
    sa_cases.append({"name": f"sasolver-request-from-pndm-sd15-{n}", "config": pndm_sd15, "request": "sa_solver", "steps": n})
sa_cases.append({"name": "sasolver-karras-request-from-pndm-sd15-20", "config": pndm_sd15, "request": "sa_solver_karras", "steps": 20})
# A DPM-Solver config that writes its algorithm_type out: from_config would carry "dpmsolver++" over, which the
# request names replace with SA-Solver's own.
sa_cases.append({"name": "sasolver-request-from-dpm-explicit-algorithm-15", "config": {**dpm, "algorithm_type": "dpmsolver++", "solver_order": 2}, "request": "sa_solver", "steps": 15})
sa_cases.append({"name": "sasolver-karras-request-bounds-from-euler-10", "config": {**euler, **lms_bounds}, "request": "sa_solver_karras", "steps": 10})
sa_cases.append({"name": "sasolver-request-from-sd2-euler-vpred-10", "config": {**sdxl_euler, **vpred}, "request": "sa_solver", "steps": 10})
sa_cases.append({"name": "sasolver-model-request-dpmpp-2m-10", "config": sa, "request": "dpmpp_2m", "steps": 10})
sa_cases.append({"name": "sasolver-noise-model-request-class-10", "config": {**sa, "algorithm_type": "noise_prediction", "predictor_order": 3}, "request": "SASolverScheduler", "steps": 10})
sa_cases.append({"name": "sasolver-8x8-15", "config": sa, "steps": 15, "shape": (1, 4, 8, 8)})
sa_cases.append({"name": "sasolver-batch2-8x8-8", "config": sa, "steps": 8, "shape": (2, 4, 8, 8)})
# Beta sigmas (use_beta_sigmas: scipy's beta.ppf at 0.6, 0.6).
sa_cases.append({"name": "sasolver-beta-12", "config": {**sa, "use_beta_sigmas": True}, "steps": 12})
sa_cases.append({"name": "sasolver-beta-noise-p3-c3-10", "config": {**sa, "use_beta_sigmas": True, "algorithm_type": "noise_prediction", "predictor_order": 3,
                                                                      "corrector_order": 3}, "steps": 10})
sa_cases.append({"name": "sasolver-beta-40", "config": {**sa, "use_beta_sigmas": True}, "steps": 40})
sa_cases.append({"name": "sasolver-beta-request-from-euler-beta-20", "config": {**euler, "use_karras_sigmas": False, "use_beta_sigmas": True},
                 "request": "sa_solver", "steps": 20})
for seed, case in enumerate(sa_cases, start=8000):
    CASES.append({**case, "pipeline": None, "seed": seed, "add_noise": True})

# The DreamBooth DDPM config above (variance_type "fixed_small", which from_config carries over and the DPM-Solver
# family and SA-Solver ignore) switched to those, and a DPM-Solver config written with "variance_type": null switched to
# DDPM (whose _get_variance then takes fixed_small's variance). Seeds 9500 on.
var_cases = [
    {"name": "variance-ddpm-request-dpmpp-2m-karras-20", "config": ddpm, "request": "dpmpp_2m_karras", "steps": 20},
    {"name": "variance-ddpm-request-dpmpp-2m-sde-12", "config": ddpm, "request": "dpmpp_2m_sde", "steps": 12},
    {"name": "variance-ddpm-request-dpmpp-2s-10", "config": ddpm, "request": "dpmpp_2s", "steps": 10},
    {"name": "variance-ddpm-request-sa-solver-10", "config": ddpm, "request": "sa_solver", "steps": 10},
    {"name": "variance-dpm-null-request-ddpm-10", "config": {**dpm, "variance_type": None}, "request": "ddpm", "steps": 10},
]
for seed, case in enumerate(var_cases, start=9500):
    CASES.append({**case, "pipeline": None, "seed": seed})

# Real models' scheduler configs (test/fixtures/model-configs, as their repositories ship them) switched by request
# names across families, with the keys from_config carries over from each (Euler a's null sigma bounds and trailing
# spacing, DDIM's v-prediction, a DDIM config without steps_offset). A cross-check of every such config × request name
# × 1/4/20/50 steps found the runtime in step with diffusers wherever both run (docs/PARITY.md); these pin a sample. No pipeline (the
# SD 1.x/2.x rewrites change none of these files but waifu-diffusion's steps_offset; the other cases cover those).
# DPMSolverSDEScheduler is left out: with no noise_sampler_seed in the file diffusers seeds it at random. Seeds 9600 on.
_real_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "model-configs")


def real_config(model):
    with open(os.path.join(_real_dir, model, "scheduler", "scheduler_config.json")) as fh:
        return json.load(fh)


real_cases = [
    {"name": "realcfg-sdxl-turbo-request-dpmpp-2m-karras-4", "config": real_config("sdxl-turbo-onnx"), "request": "dpmpp_2m_karras", "steps": 4},
    {"name": "realcfg-sdxl-turbo-request-tcd-4-eta-0.3", "config": real_config("sdxl-turbo-onnx"), "request": "tcd", "steps": 4, "eta": 0.3},
    {"name": "realcfg-sdxl-turbo-request-sa-solver-4", "config": real_config("sdxl-turbo-onnx"), "request": "sa_solver", "steps": 4},
    {"name": "realcfg-playground-v2-request-euler-karras-20", "config": real_config("playground-v2"), "request": "euler_karras", "steps": 20},
    {"name": "realcfg-playground-v2-request-dpmpp-2m-sde-karras-20", "config": real_config("playground-v2"), "request": "dpmpp_2m_sde_karras", "steps": 20},
    {"name": "realcfg-sd21-768-request-dpmpp-3m-sde-karras-20", "config": real_config("sd21-768"), "request": "dpmpp_3m_sde_karras", "steps": 20},
    {"name": "realcfg-sd21-768-request-sa-solver-karras-12", "config": real_config("sd21-768"), "request": "sa_solver_karras", "steps": 12},
    {"name": "realcfg-sd21-768-request-unipc-20", "config": real_config("sd21-768"), "request": "unipc", "steps": 20},
    {"name": "realcfg-sdxl-refiner-request-dpm2-a-karras-10", "config": real_config("sdxl-refiner"), "request": "dpm2_a_karras", "steps": 10},
    {"name": "realcfg-waifu-0.2-request-euler-a-20", "config": real_config("waifu-diffusion-0.2"), "request": "euler_a", "steps": 20},
    {"name": "realcfg-sd15-inpainting-request-heun-10", "config": real_config("sd15-inpainting"), "request": "heun", "steps": 10},
    {"name": "realcfg-sd14-onnx-request-lms-karras-25", "config": real_config("sd14-onnx"), "request": "lms_karras", "steps": 25},
    {"name": "realcfg-sdxl-request-dpmpp-2s-karras-20", "config": real_config("sdxl"), "request": "dpmpp_2s_karras", "steps": 20},
    {"name": "realcfg-owl-dreambooth-request-deis-20", "config": real_config("owl-dreambooth"), "request": "deis", "steps": 20},
    {"name": "realcfg-owl-dreambooth-request-dpmpp-3m-sde-karras-20", "config": real_config("owl-dreambooth"), "request": "dpmpp_3m_sde_karras", "steps": 20},
]
for seed, case in enumerate(real_cases, start=9600):
    CASES.append({**case, "pipeline": None, "seed": seed})

# Beta sigmas (use_beta_sigmas: ComfyUI's "beta" scheduler, scipy's beta.ppf at alpha = beta = 0.6) in every class that
# has them (DPM++ SDE's and SA-Solver's cases are in their groups above), from a model's own config and carried over to
# a request's class by from_config. Made with torch 1.13 (see the header), whose sigma table the runtime follows; one
# case (the cosine schedule's) with torch 2.x and numpy 2 instead: there numpy 1.x's float32 weight in _sigma_to_t
# lands the first sigma on timestep 999, numpy 2 and the runtime on 998.99… (998), which the next ones repeat, so the
# case starts at index 0 as image-to-image sets it (a step that finds its index by timestep would start at the
# second: docs/PARITY.md). Seeds 9700 on.
euler_beta = {**euler, "use_karras_sigmas": False, "use_beta_sigmas": True}
dpm_beta = {**dpm, "use_beta_sigmas": True}
beta_cases = []
for n in [1, 2, 10, 25, 50]:
    beta_cases.append({"name": f"beta-euler-leading-{n}", "config": euler_beta, "steps": n})
beta_cases.append({"name": "beta-euler-linspace-20", "config": {**euler_beta, "timestep_spacing": "linspace"}, "steps": 20})
beta_cases.append({"name": "beta-euler-trailing-vpred-12", "config": {**euler_beta, **vpred, "timestep_spacing": "trailing"}, "steps": 12})
beta_cases.append({"name": "beta-euler-bounds-sigma-min-15", "config": {**euler_beta, "sigma_min": 0.05, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"}, "steps": 15})
beta_cases.append({"name": "beta-euler-img2img-begin-7-of-20", "config": euler_beta, "steps": 20, "begin_index": 7})
for n in [1, 2, 10, 20, 31]:
    beta_cases.append({"name": f"beta-dpm-{n}", "config": dpm_beta, "steps": n})
beta_cases.append({"name": "beta-dpm-50", "config": dpm_beta, "steps": 50})
beta_cases.append({"name": "beta-dpm-img2img-begin-12-of-40", "config": dpm_beta, "steps": 40, "begin_index": 12})
beta_cases.append({"name": "beta-dpm-sde-14", "config": {**dpm_beta, "algorithm_type": "sde-dpmsolver++"}, "steps": 14})
beta_cases.append({"name": "beta-dpm-order3-20", "config": {**dpm_beta, "solver_order": 3}, "steps": 20})
beta_cases.append({"name": "beta-dpm-linspace-sigma-min-18", "config": {**dpm_beta, "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, "steps": 18})
beta_cases.append({"name": "beta-dpm-cosine-12-begin-0", "config": {**dpm_beta, "beta_schedule": "squaredcos_cap_v2"}, "steps": 12, "begin_index": 0,
                   "numpy_major": 2})
beta_cases.append({"name": "beta-dpm-bounds-own-12", "config": {**dpm_beta, **lms_bounds}, "steps": 12})
beta_cases.append({"name": "beta-dpmss-10", "config": {**dpmss, "use_beta_sigmas": True}, "steps": 10})
beta_cases.append({"name": "beta-dpmss-order3-12", "config": {**dpmss, "use_beta_sigmas": True, "solver_order": 3}, "steps": 12})
beta_cases.append({"name": "beta-deis-15", "config": {**deis, "use_beta_sigmas": True}, "steps": 15})
beta_cases.append({"name": "beta-deis-order3-bounds-own-12", "config": {**deis, "use_beta_sigmas": True, "solver_order": 3, **lms_bounds}, "steps": 12})
beta_cases.append({"name": "beta-unipc-12", "config": {**unipc, "use_beta_sigmas": True}, "steps": 12})
beta_cases.append({"name": "beta-unipc-sigma-min-20", "config": {**unipc, "use_beta_sigmas": True, "final_sigmas_type": "sigma_min"}, "steps": 20})
beta_cases.append({"name": "beta-unipc-40", "config": {**unipc, "use_beta_sigmas": True}, "steps": 40})
beta_cases.append({"name": "beta-lms-15", "config": {**lms, "use_beta_sigmas": True}, "steps": 15})
beta_cases.append({"name": "beta-lms-bounds-own-12", "config": {**lms, "use_beta_sigmas": True, **lms_bounds}, "steps": 12})
beta_cases.append({"name": "beta-heun-10", "config": {**heun, "use_beta_sigmas": True}, "steps": 10})
beta_cases.append({"name": "beta-kdpm2-10", "config": {**kdpm2, "use_beta_sigmas": True}, "steps": 10})
beta_cases.append({"name": "beta-kdpm2a-10", "config": {**kdpm2a, "use_beta_sigmas": True}, "steps": 10})
# A model whose config sets use_beta_sigmas, switched by request names: from_config carries it to the other classes
# (Euler a has no such option and drops it).
for req, n in [("dpmpp_2m", 20), ("dpmpp_2m_sde", 12), ("unipc", 15), ("deis", 15), ("lms", 12), ("heun", 10), ("dpm2", 10), ("dpm2_a", 10),
               ("dpmpp_2s", 10), ("euler_a", 10), ("EulerDiscreteScheduler", 30)]:
    beta_cases.append({"name": f"beta-euler-request-{req.replace('_', '-')}-{n}", "config": euler_beta, "request": req, "steps": n})
beta_cases.append({"name": "beta-dpm-request-euler-25", "config": dpm_beta, "request": "euler", "steps": 25})
for seed, case in enumerate(beta_cases, start=9700):
    CASES.append({**case, "pipeline": None, "seed": seed})

# DPM-Solver's use_lu_lambdas: log-sigmas evenly spaced between the table's ends, timesteps rounded (but on the cosine
# schedule). diffusers tests Karras first, then Lu, then the other ramps, and refuses none of them beside Lu.
# Seeds 9800 on.
dpm_lu = {**dpm, "use_lu_lambdas": True}
lu_cases = []
for n in [1, 2, 10, 25, 50]:
    lu_cases.append({"name": f"lu-dpm-{n}", "config": dpm_lu, "steps": n})
lu_cases.append({"name": "lu-dpm-sde-14", "config": {**dpm_lu, "algorithm_type": "sde-dpmsolver++"}, "steps": 14})
lu_cases.append({"name": "lu-dpm-order3-20", "config": {**dpm_lu, "solver_order": 3}, "steps": 20})
lu_cases.append({"name": "lu-dpm-plain-sigma-min-12", "config": {**dpm_lu, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "steps": 12})
lu_cases.append({"name": "lu-dpm-vpred-trailing-10", "config": {**dpm_lu, **vpred, "timestep_spacing": "trailing"}, "steps": 10})
lu_cases.append({"name": "lu-dpm-linear-linspace-15", "config": {**dpm_lu, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "linspace"}, "steps": 15})
lu_cases.append({"name": "lu-dpm-cosine-12", "config": {**dpm_lu, "beta_schedule": "squaredcos_cap_v2"}, "steps": 12})
lu_cases.append({"name": "lu-dpm-cosine-clipped-12", "config": {**dpm_lu, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, "steps": 12})
lu_cases.append({"name": "lu-dpm-with-exponential-12", "config": {**dpm_lu, "use_exponential_sigmas": True}, "steps": 12})
lu_cases.append({"name": "lu-dpm-with-beta-12", "config": {**dpm_lu, "use_beta_sigmas": True}, "steps": 12})
lu_cases.append({"name": "lu-dpm-with-karras-12", "config": {**dpm_lu, "use_karras_sigmas": True}, "steps": 12})
lu_cases.append({"name": "lu-dpm-img2img-begin-6-of-20", "config": dpm_lu, "steps": 20, "begin_index": 6})
lu_cases.append({"name": "lu-dpm-request-dpmpp-2m-karras-20", "config": dpm_lu, "request": "dpmpp_2m_karras", "steps": 20})
lu_cases.append({"name": "lu-dpm-request-dpmpp-3m-sde-15", "config": dpm_lu, "request": "dpmpp_3m_sde", "steps": 15})
lu_cases.append({"name": "lu-dpm-request-unipc-12", "config": dpm_lu, "request": "unipc", "steps": 12})
for seed, case in enumerate(lu_cases, start=9800):
    CASES.append({**case, "pipeline": None, "seed": seed})

# torch >= 2.1 fills torch.linspace differently from the torch the runtime follows (see docs/PARITY.md), so the
# betas of this torch go beside the cases: the test runs both sides from the same betas.
betas = {}
for sched, start, end in [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)]:
    s = DDIMScheduler(beta_start=start, beta_end=end, beta_schedule=sched)
    betas[f"{sched} {start} {end}"] = [F32(v) for v in s.betas.tolist()]
if ONLY is None:
    with open(os.path.join(out_dir, "..", "scheduler-betas.json"), "w") as fh:
        fh.write(dumps({"torch": torch.__version__, "betas": betas}) + "\n")

matched = 0
for i, case in enumerate(CASES):
    case.setdefault("seed", i)
    if ONLY is not None and not any(case["name"].startswith(p) for p in ONLY):
        continue
    matched += 1
    if case.get("numpy_major") not in (None, int(np.__version__.split(".")[0])):
        # made where numpy's arithmetic is the one the case shows: left as it is here
        print(case["name"], f"skipped: made with numpy {case['numpy_major']}.x", file=sys.stderr)
        continue
    rec = run_case(case)
    with open(os.path.join(out_dir, case["name"] + ".json"), "w") as fh:
        fh.write(dumps(rec) + "\n")
    print(case["name"], rec["scheduler"], rec["timesteps"][:4], rec["built_config"], len(rec["warnings"]), file=sys.stderr)
if matched == 0:
    sys.exit(f"--only {','.join(ONLY or [])}: no case name starts with any of these")
