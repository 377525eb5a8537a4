#!/usr/bin/env python3
"""Checks single-file checkpoint exports (scripts/export-onnx.sh CHECKPOINT OUT) on tiny random pipelines, on the CPU:

    PYTHONPATH=<diffusers>/src:scripts python3 scripts/check_single_file.py WORK_DIR [sd1 xl]

<diffusers> is a diffusers source tree with its repository's scripts/ beside src/ (the conversion scripts
scripts/convert_diffusers_to_original_stable_diffusion.py and convert_diffusers_to_original_sdxl.py make the single
files; DIFFUSERS_SCRIPTS names another folder holding them).

For each family it saves a tiny random pipeline as a diffusers folder, converts it with diffusers' script to one
original-layout .safetensors file (and, for SD 1.x, a .ckpt), and checks:
- the single file loads (export_sd.load_single_file, with --config a copy of the folder without weights) into the same
  weights as the folder, tensor for tensor;
- the folder and the single file exported by scripts/export-onnx.sh (EXPORT_PYTHON = this Python), plain float32 and
  fused float16, give the same ONNX components: the plain ones run in onnxruntime (CPU) on the same inputs agree within
  1e-4 of the output's scale; the fused ones (CUDA-only operators, so not run here) have byte-identical graphs and
  weights; every other file of the two exports (configs, tokenizers, scheduler, LoRA maps) is identical;
- the errors: a .ckpt without --allow-pickle, a file that is not a checkpoint, a LoRA file, a model type that cannot be
  inferred without --config, an unreachable hub config, a --config of another architecture.
The tiny models follow the block structure the conversion scripts hard-code (SD 1.x: two resnets per down block, VAE
of four blocks; SDXL: Down/CrossAttn/CrossAttn). Exits non-zero with the first failing check.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import export_sd

WORK = Path(sys.argv[1]).resolve()
FAMILIES = sys.argv[2:] or ["sd1", "xl"]
ROOT = Path(__file__).resolve().parent.parent
EXPORT_SH = ROOT / "scripts" / "export-onnx.sh"
RTOL = 1e-4


def fail(msg):
    raise SystemExit(f"check_single_file: FAIL {msg}")


def say(msg):
    print(f"{time.strftime('%H:%M:%S')} check_single_file: {msg}", flush=True)


def scripts_dir() -> Path:
    import diffusers
    d = Path(os.environ.get("DIFFUSERS_SCRIPTS") or Path(diffusers.__file__).resolve().parents[2] / "scripts")
    if not (d / "convert_diffusers_to_original_stable_diffusion.py").is_file():
        fail(f"diffusers' conversion scripts not found in {d} (set DIFFUSERS_SCRIPTS)")
    return d


def tiny(kind):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(0)
    tok = CLIPTokenizer(str(ROOT / "src/demo/assets/vocab.json"), str(ROOT / "src/demo/assets/merges.txt"), model_max_length=77)

    def te(hidden=32, proj=False):
        c = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, hidden_act="gelu" if proj else "quick_gelu", projection_dim=hidden)
        return (CLIPTextModelWithProjection(c) if proj else CLIPTextModel(c)).eval()

    # Four VAE blocks: the conversion scripts number the decoder's blocks as SD's four.
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32, sample_size=64)
    if kind == "sd1":
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        return StableDiffusionPipeline(vae=vae, text_encoder=te(), tokenizer=tok, unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "xl":
        vae.register_to_config(force_upcast=True)
        # The two text encoders differ in width, as SDXL's do (768, 1280): diffusers tells them apart by it.
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=96,
                                    attention_head_dim=8, norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8, transformer_layers_per_block=(1, 1, 2))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te(32), text_encoder_2=te(64, proj=True), tokenizer=tok, tokenizer_2=tok, unet=unet,
                                         scheduler=EulerDiscreteScheduler())
    fail(f"unknown family {kind}")


def make_files(kind, base: Path):
    """diffusers folder, config-only copy, and the single file(s) made by diffusers' conversion script."""
    from safetensors.torch import load_file, save_file
    folder, config, conv_in = base / "diffusers", base / "config", base / "convert-input"
    tiny(kind).save_pretrained(str(folder))
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    # transformers 5 saves CLIPTextModel without its text_model. prefix; the conversion scripts (and every original
    # checkpoint: cond_stage_model.transformer.text_model.*) have it.
    shutil.copytree(folder, conv_in)
    te = conv_in / "text_encoder" / "model.safetensors"
    save_file({(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in load_file(str(te)).items()}, str(te))
    script = scripts_dir() / ("convert_diffusers_to_original_sdxl.py" if kind == "xl" else "convert_diffusers_to_original_stable_diffusion.py")
    files = {"safetensors": base / f"{kind}.safetensors"}
    if kind == "sd1":
        files["ckpt"] = base / f"{kind}.ckpt"
    for fmt, path in files.items():
        args = [sys.executable, str(script), "--model_path", str(conv_in), "--checkpoint_path", str(path)] + (["--use_safetensors"] if fmt == "safetensors" else [])
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(conv_in)
    return folder, config, files


def check_weights(kind, folder, config, single):
    from diffusers import DiffusionPipeline
    want = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    got, source = export_sd.load_single_file(str(single), str(config))
    if type(got).__name__ != type(want).__name__:
        fail(f"{kind}: single file loaded as {type(got).__name__}, folder as {type(want).__name__}")
    n = 0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(want, name, None), getattr(got, name, None)
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        bad = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])] + [k for k in sb if k not in sa]
        if bad:
            fail(f"{kind}: {name} from the single file differs from the folder's in {len(bad)} tensors: {bad[:5]}")
        n += len(sa)
    say(f"{kind}: {single.name} loads as {source['pipeline_class']} into the folder's weights ({n} tensors equal)")


def export_sh(src, out, *args, env=None, expect_fail=False):
    e = dict(os.environ, EXPORT_PYTHON=sys.executable, **(env or {}))
    r = subprocess.run(["bash", str(EXPORT_SH), str(src), str(out), *args], env=e, capture_output=True, text=True)
    if expect_fail:
        if r.returncode == 0:
            fail(f"export-onnx.sh {Path(src).name} {' '.join(args)} succeeded; expected an error")
        return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    if r.returncode != 0:
        fail(f"export-onnx.sh {src} {out} {' '.join(args)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    if "layout ok" not in r.stdout:
        fail(f"export-onnx.sh {src}: no 'layout ok' line:\n{r.stdout[-2000:]}")
    return r.stdout


def export_py(src, out, *args):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_sd.py"), str(src), str(out), *args], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"export_sd.py {src} {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}")


def compare_plain(kind, a: Path, b: Path, pipe):
    """Every component of two plain exports in onnxruntime on the same inputs."""
    torch.manual_seed(1)
    worst = {}
    for name, _m, args, inames, onames, _axes, _t in export_sd._component_specs(pipe, "cpu", torch.float32, True):
        feeds = {n: x.numpy() for n, x in zip(inames, args)}
        ra = ort.InferenceSession(str(a / name / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        rb = ort.InferenceSession(str(b / name / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        for o, x, y in zip(onames, ra, rb):
            scale = max(1e-6, float(np.max(np.abs(x))))
            err = float(np.max(np.abs(x - y))) / scale if x.shape == y.shape else float("inf")
            if err > RTOL:
                fail(f"{kind} plain {name}.{o}: folder {x.shape} vs single file {y.shape}, relative error {err:.2e}")
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


def compare_files(kind, variant, a: Path, b: Path):
    """Every file of two exports byte for byte, but the manifest (timings, source); the manifests' components alike."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if fa != fb:
        fail(f"{kind} {variant}: the exports hold different files: {sorted(set(map(str, fa)) ^ set(map(str, fb)))}")
    differ = [str(p) for p in fa if p.name != export_sd.MANIFEST and not filecmp.cmp(a / p, b / p, shallow=False)]
    if differ:
        fail(f"{kind} {variant}: files differ between the folder's and the single file's export: {differ}")
    ma, mb = (json.loads((d / export_sd.MANIFEST).read_text()) for d in (a, b))
    strip = lambda m: {n: {k: v for k, v in c.items() if k != "seconds"} for n, c in m["components"].items()}  # noqa: E731
    if strip(ma) != strip(mb) or ma["variant"] != mb["variant"] or ma["pipeline"] != mb["pipeline"]:
        fail(f"{kind} {variant}: the manifests differ")
    if "source" not in mb or mb["source"].get("single_file") is None:
        fail(f"{kind} {variant}: the single file's manifest does not record its source")
    return len(fa)


def expect_error(what, src, out, args, needles, env=None):
    msg = export_sh(src, out, *args, env=env, expect_fail=True)
    for n in needles:
        if n not in msg:
            fail(f"{what}: error '{msg}' does not say '{n}'")
    say(f"error ok ({what}): {msg[:300]}")


def check_errors(base: Path, sd1_files, sd1_config, xl_config):
    from safetensors.torch import save_file
    out = base / "err-out"
    expect_error("a .ckpt without --allow-pickle", sd1_files["ckpt"], out, [], ["pickle", "run code", "--allow-pickle"])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_sd.py"), str(sd1_files["ckpt"]), str(base / "err-py")], capture_output=True, text=True)
    if r.returncode == 0 or "--allow-pickle" not in r.stderr:
        fail(f"export_sd.py took a .ckpt without --allow-pickle: {r.stderr[-500:]}")
    notes = base / "notes.safetensors"
    notes.write_text("these are not weights\n")
    expect_error("not a safetensors file", notes, out, [], ["notes.safetensors is not a safetensors file"])
    lora = base / "style-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    expect_error("a LoRA file", lora, out, [], ["is not a single-file Stable Diffusion checkpoint", "model.diffusion_model.*", "LoRA"])
    expect_error("tiny SD 1.x without --config", sd1_files["safetensors"], out, [], ["cannot infer the model type", "--config"])
    # The keys diffusers recognises SD 1.x by, in a file too small to be a model: it infers 'v1' and wants its hub config.
    fake = base / "v1-shaped.safetensors"
    save_file({"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(1), "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(1, 1)}, str(fake))
    with tempfile.TemporaryDirectory() as hf_home:
        expect_error("hub config unreachable", fake, out, [], ["stable-diffusion-v1-5/stable-diffusion-v1-5", "could not be fetched",
                                                                "Pass --config a local diffusers folder"], env={"HF_HUB_OFFLINE": "1", "HF_HOME": hf_home})
    expect_error("--config of another architecture", sd1_files["safetensors"], out, ["--config", str(xl_config)], ["StableDiffusionXLPipeline", "SD 1.x/2.x layout"])
    empty = base / "empty-config"
    empty.mkdir(exist_ok=True)
    expect_error("--config without model_index.json", sd1_files["safetensors"], out, ["--config", str(empty)], ["no model_index.json"])


def main():
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    made = {}
    for kind in FAMILIES:
        base = WORK / kind
        base.mkdir()
        folder, config, files = make_files(kind, base)
        made[kind] = (config, files)
        single = files["safetensors"]
        say(f"{kind}: {single.name} ({single.stat().st_size} bytes) made by diffusers' conversion script")
        check_weights(kind, folder, config, single)
        pipe = tiny(kind)
        # plain float32: the folder through export_sd.py (export-onnx.sh --plain exports a folder with optimum), the single file
        # through export-onnx.sh --plain
        export_py(folder, base / "folder-plain", "--plain", "--fp32", "--device", "cpu")
        export_sh(single, base / "single-plain", "--plain", "--config", str(config))
        worst = compare_plain(kind, base / "folder-plain", base / "single-plain", pipe)
        n = compare_files(kind, "plain", base / "folder-plain", base / "single-plain")
        say(f"{kind}: plain exports agree in onnxruntime (max relative difference {json.dumps({k: float(f'{v:.2e}') for k, v in worst.items()})}); "
            f"{n} files identical but the manifest")
        if "ckpt" in files:
            export_sh(files["ckpt"], base / "ckpt-plain", "--plain", "--config", str(config), "--allow-pickle")
            worst = compare_plain(kind, base / "folder-plain", base / "ckpt-plain", pipe)
            compare_files(kind, "plain .ckpt", base / "folder-plain", base / "ckpt-plain")
            say(f"{kind}: the .ckpt (--allow-pickle) exports as the folder does (max relative difference {max(worst.values()):.2e})")
        # fused float16 (CUDA-only operators): both through export-onnx.sh, compared file for file
        export_sh(folder, base / "folder-fused", "--device", "cpu")
        export_sh(single, base / "single-fused", "--device", "cpu", "--config", str(config))
        n = compare_files(kind, "fused", base / "folder-fused", base / "single-fused")
        say(f"{kind}: fused exports identical ({n} files: graphs, weights, configs, LoRA maps)")
    if "sd1" in made and "xl" in made:
        check_errors(WORK, made["sd1"][1], made["sd1"][0], made["xl"][0])
    say("all passed")


if __name__ == "__main__":
    main()
