#!/usr/bin/env python3
"""Checks scripts/export_sd.py on tiny random pipelines of every family, on the CPU:

    PYTHONPATH=<diffusers>/src:scripts python3 scripts/check_export.py WORK_DIR [sd1 sd2 xl lcm]

For each family (SD 1.x; SD 2.x with v-prediction, linear projections and upcast attention; SDXL with both text
encoders and a force_upcast VAE; LCM with timestep_cond) it exports the same weights twice:
- plain float32: every component is loaded in onnxruntime (CPU) and its outputs are compared with torch's on the same
  inputs (within 1e-4 of the output's scale), so names, inputs and outputs are the ones the runtime serves;
- fused float16 (the CUDA default): the manifest is read back and checked: fused operators present in the UNet and
  the VAE, the timestep (and SDXL time_ids) embedding kept in float32, inputs and outputs float32, SD 2.x attention
  and the SDXL VAE kept in float32. The CPU cannot run these graphs; `scripts/gpu_sd15.py` serves one on a GPU.
Exits non-zero with the first failing check. Needs torch, diffusers (source), transformers, onnx and onnxruntime.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch

import export_sd

work = sys.argv[1]
families = sys.argv[2:] or ["sd1", "sd2", "xl", "lcm"]
os.makedirs(work, exist_ok=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(kind):
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(0)
    # OpenAI CLIP's vocabulary and merges, as the demo model ships them (the e2e reference tokenizer's files).
    tok = CLIPTokenizer(os.path.join(ROOT, "src/demo/assets/vocab.json"), os.path.join(ROOT, "src/demo/assets/merges.txt"), model_max_length=77)

    def te(hidden=32, proj=None):
        c = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=proj or hidden)
        return (CLIPTextModelWithProjection(c) if proj else CLIPTextModel(c)).eval()

    def vae():
        return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             latent_channels=4, norm_num_groups=32, sample_size=32)

    def unet(**kw):
        base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        base.update(kw)
        return UNet2DConditionModel(**base)

    sd = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sd1":
        return StableDiffusionPipeline(vae=vae(), text_encoder=te(), tokenizer=tok, unet=unet(), scheduler=PNDMScheduler(skip_prk_steps=True), **sd)
    if kind == "sd2":
        u = unet(upcast_attention=True, use_linear_projection=True, attention_head_dim=(2, 4))
        return StableDiffusionPipeline(vae=vae(), text_encoder=te(), tokenizer=tok, unet=u, scheduler=DDIMScheduler(prediction_type="v_prediction"), **sd)
    if kind == "lcm":
        return StableDiffusionPipeline(vae=vae(), text_encoder=te(), tokenizer=tok, unet=unet(time_cond_proj_dim=16), scheduler=LCMScheduler(), **sd)
    if kind == "xl":
        u = unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                 transformer_layers_per_block=(1, 1))
        v = vae()
        v.register_to_config(force_upcast=True)
        return StableDiffusionXLPipeline(vae=v, text_encoder=te(32), text_encoder_2=te(32, proj=32), tokenizer=tok, tokenizer_2=tok, unet=u,
                                         scheduler=EulerDiscreteScheduler())
    raise SystemExit(f"check_export: unknown family {kind}")


def fail(msg):
    raise SystemExit(f"check_export: FAIL {msg}")


def check_plain(kind, pipe, out):
    """Each plain component in onnxruntime against torch on the inputs the export traced with."""
    specs = export_sd._component_specs(pipe, "cpu", torch.float32, True)
    for name, module, args, inames, onames, _axes, _t in specs:
        s = ort.InferenceSession(os.path.join(out, name, "model.onnx"), providers=["CPUExecutionProvider"])
        got = s.run(None, {n: a.numpy() for n, a in zip(inames, args)})
        with torch.no_grad():
            want = module(*args)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        for o, g, w in zip(onames, got, want):
            w = w.numpy()
            err = float(np.max(np.abs(g - w))) / max(1e-6, float(np.max(np.abs(w))))
            if g.shape != w.shape or err > 1e-4:
                fail(f"{kind} plain {name}.{o}: shape {g.shape} vs {w.shape}, relative error {err:.2e}")
    print(f"{kind}: plain float32 export matches torch ({', '.join(s[0] for s in specs)})", flush=True)


def check_fused(kind, out):
    m = json.load(open(os.path.join(out, "onnx_export.json")))
    if m["variant"] != "fused" or m["target"] != "cuda":
        fail(f"{kind} fused: manifest says {m['variant']}/{m['target']}")
    c = m["components"]
    if not c["unet"]["fused_ops"].get("MultiHeadAttention") or not c["unet"]["fused_ops"].get("GroupNorm"):
        fail(f"{kind} fused: UNet fusions missing: {c['unet']['fused_ops']}")
    if not c["vae_decoder"]["fused_ops"].get("GroupNorm"):
        fail(f"{kind} fused: VAE fusions missing: {c['vae_decoder']['fused_ops']}")
    if c["unet"].get("fp32_nodes", 0) < 5:
        fail(f"{kind} fused: the timestep embedding was not kept in float32 ({c['unet'].get('fp32_nodes')} nodes)")
    if kind == "sd2" and "MultiHeadAttention" not in c["unet"].get("fp32_ops", []):
        fail("sd2 fused: upcast_attention but attention converted to float16")
    vae_dtype = c["vae_decoder"]["dtype"]
    if (kind == "xl") != (vae_dtype == "float32"):
        fail(f"{kind} fused: VAE decoder is {vae_dtype}")
    for name in c:
        g = onnx.load(os.path.join(out, name, "model.onnx"), load_external_data=False).graph
        floats = [v for v in list(g.input) + list(g.output) if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)]
        if any(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT for v in floats):
            fail(f"{kind} fused {name}: an input or output is not float32")
        files = set(os.listdir(os.path.join(out, name)))
        if not {"config.json", "model.onnx", "model.onnx_data"} <= files or files - {"config.json", "model.onnx", "model.onnx_data", "lora_map.json"}:
            fail(f"{kind} fused {name}: files {sorted(files)} (one graph, one weights file, its config and LoRA map)")
    print(f"{kind}: fused float16 export: {json.dumps({k: v.get('fused_ops') for k, v in c.items()})}", flush=True)


for kind in families:
    for variant in ("plain", "fused"):
        out = os.path.join(work, f"{kind}-{variant}")
        if os.path.exists(out):
            import shutil
            shutil.rmtree(out)
        pipe = tiny(kind)
        export_sd.export_pipeline(pipe, out, fused=variant == "fused", fp16=variant == "fused", device="cpu")
        (check_plain(kind, tiny(kind), out) if variant == "plain" else check_fused(kind, out))
print("check_export: all passed", flush=True)
