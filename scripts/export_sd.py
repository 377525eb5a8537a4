#!/usr/bin/env python3
"""Export a diffusers Stable Diffusion pipeline to the ONNX layout diffusers-runtime serves.

    python3 scripts/export_sd.py SOURCE OUT_DIR [--plain] [--fp32] [--device cuda|cpu] [--no-vae-encoder]
                                 [--config DIFFUSERS_FOLDER_OR_ID] [--allow-pickle]

SOURCE is a Hugging Face model id or a local diffusers folder (SD 1.x, 2.x, SDXL, LCM, Turbo), or a single-file
checkpoint in the original layout (.safetensors; .ckpt only with --allow-pickle), loaded with diffusers'
`from_single_file`: the pipeline class is inferred from the checkpoint's keys as diffusers infers it, or taken from
--config (a diffusers folder or hub id of the same architecture, whose configs, tokenizers and scheduler are used).

Default (fused, for the CUDA execution provider): every component is exported in float32 with diffusers' plain
attention processor (the pattern onnxruntime's fusions match), run through onnxruntime's transformer optimizer
(UNet: MultiHeadAttention, GroupNorm/SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd; VAE: GroupNorm, NhwcConv
and attention; CLIP: Attention, SkipLayerNormalization), then converted to float16 while keeping in float32 what
diffusers computes in float32: the sinusoidal timestep and time-id embeddings, attention of UNets configured with
`upcast_attention` (SD 2.x), and the VAE of SDXL pipelines whose VAE config says `force_upcast`. Inputs and
outputs stay float32. Each component is written as model.onnx (graph) + model.onnx_data (weights), and
onnx_export.json in OUT_DIR records what was done; the runtime reads it (a fused export needs CUDA).

--plain writes the unfused graphs (diffusers' default attention, traced in the target dtype) that any execution
provider runs, CPU included; --fp32 skips the float16 conversion.

Needs torch, diffusers, transformers, onnx and onnxruntime (the Python package ships the optimizer; its CPU build
is enough). `export_pipeline()` is the same export for a pipeline object already in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

MANIFEST = "onnx_export.json"
LORA_MAP = "lora_map.json"
LORA_MAP_FORMAT = 1
FORMAT = 1
# Ops ORT's optimizer emits that only the CUDA execution provider implements.
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd", "PackedMultiHeadAttention")
# Inputs whose first layers diffusers computes in float32 whatever the model dtype (get_timestep_embedding casts
# to float32): in float16 the sinusoid of t*freq loses a large part of a radian at t near 1000.
FP32_EMBEDDING_INPUTS = ("timestep", "time_ids")
LINEAR_OPS = ("MatMul", "Gemm", "FusedMatMul")


def log(*a):
    print(time.strftime("%H:%M:%S"), "export:", *a, flush=True)


def versions():
    import onnx
    import onnxruntime
    import torch
    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - version only for the manifest
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------
# Wrappers with optimum's input and output names (PROTOCOLS.md 4.2), so the runtime serves the export as it serves
# optimum's.

def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, m, hidden_states):
            super().__init__()
            self.m, self.hidden_states = m, hidden_states

        def forward(self, input_ids):
            o = self.m(input_ids=input_ids, output_hidden_states=self.hidden_states)
            first = o.text_embeds if hasattr(o, "text_embeds") else o.pooler_output
            out = [first, o.last_hidden_state] if hasattr(o, "text_embeds") else [o.last_hidden_state, first]
            if self.hidden_states:
                out.extend(o.hidden_states)
            return tuple(out)

    class Unet(torch.nn.Module):
        def __init__(self, m, xl, lcm):
            super().__init__()
            self.m, self.xl, self.lcm = m, xl, lcm

        def forward(self, sample, timestep, encoder_hidden_states, *extra):
            kw = {}
            extra = list(extra)
            if self.xl:
                kw["added_cond_kwargs"] = {"text_embeds": extra.pop(0), "time_ids": extra.pop(0)}
            if self.lcm:
                kw["timestep_cond"] = extra.pop(0)
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False, **kw)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample):
            return self.m.encode(sample, return_dict=False)[0].parameters

    return TextEncoder, Unet, VaeDecoder, VaeEncoder


def _component_specs(pipe, device, dtype, want_vae_encoder):
    """(name, module, args, input names, output names, dynamic axes, optimizer model type) per component."""
    import torch
    TextEncoder, Unet, VaeDecoder, VaeEncoder = _wrappers()
    xl = getattr(pipe, "text_encoder_2", None) is not None
    specs = []
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is None:
            continue
        cfg = te.config
        ids = torch.zeros(1, cfg.max_position_embeddings, dtype=torch.int64, device=device)
        proj = hasattr(te, "text_projection")
        outs = ["text_embeds", "last_hidden_state"] if proj else ["last_hidden_state", "pooler_output"]
        if xl:
            outs += [f"hidden_states.{i}" for i in range(cfg.num_hidden_layers + 1)]
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
        for o in outs:
            axes[o] = {0: "batch_size", 1: "sequence_length"} if o != outs[0] or not proj else {0: "batch_size"}
        if not proj:
            axes["pooler_output"] = {0: "batch_size"}
        specs.append((name, TextEncoder(te, xl), (ids,), ["input_ids"], outs, axes, "clip"))
    unet = pipe.unet
    uc = unet.config
    lcm = uc.time_cond_proj_dim is not None
    size = uc.sample_size if isinstance(uc.sample_size, int) else uc.sample_size[0]
    seq = pipe.text_encoder.config.max_position_embeddings if getattr(pipe, "text_encoder", None) is not None else 77
    args = [torch.randn(2, uc.in_channels, size, size, device=device, dtype=dtype), torch.tensor(999.0, device=device),
            torch.randn(2, seq, uc.cross_attention_dim, device=device, dtype=dtype)]
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    if xl:
        pooled = pipe.text_encoder_2.config.projection_dim
        n_ids = (uc.projection_class_embeddings_input_dim - pooled) // uc.addition_time_embed_dim
        args += [torch.randn(2, pooled, device=device, dtype=dtype), torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0][:n_ids]] * 2, device=device, dtype=dtype)]
        names += ["text_embeds", "time_ids"]
        axes.update({"text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"}})
    if lcm:
        args.append(torch.randn(2, uc.time_cond_proj_dim, device=device, dtype=dtype))
        names.append("timestep_cond")
        axes["timestep_cond"] = {0: "batch_size"}
    specs.append(("unet", Unet(unet, xl, lcm), tuple(args), names, ["out_sample"], axes, "unet"))
    vae = pipe.vae
    lc = vae.config.latent_channels
    specs.append(("vae_decoder", VaeDecoder(vae), (torch.randn(1, lc, size, size, device=device, dtype=dtype),), ["latent_sample"], ["sample"],
                  {"latent_sample": {0: "batch_size", 2: "height", 3: "width"}, "sample": {0: "batch_size", 2: "height_x8", 3: "width_x8"}}, "vae"))
    if want_vae_encoder:
        specs.append(("vae_encoder", VaeEncoder(vae), (torch.randn(1, vae.config.in_channels, size * 8, size * 8, device=device, dtype=dtype),), ["sample"],
                      ["latent_parameters"], {"sample": {0: "batch_size", 2: "height", 3: "width"}, "latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}}, "vae"))
    return specs


def _torch_export(module, args, path, inames, onames, axes, opset):
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inames, output_names=onames, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def _save(model_proto, folder: Path):
    """model.onnx + one model.onnx_data beside it, whatever the size (the runtime reads graphs without weights)."""
    import onnx
    for f in folder.glob("model.onnx*"):
        f.unlink()
    onnx.save_model(model_proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    for f in folder.glob("model.onnx*"):
        f.chmod(0o644)  # onnx creates the data file 0600; the serving user may not be the exporting one
    return {f.name: f.stat().st_size for f in sorted(folder.glob("model.onnx*"))}


def fp32_embedding_nodes(graph) -> list[str]:
    """Names of the nodes from the timestep / time_ids inputs up to (not including) the first linear layer: the
    sinusoidal embeddings diffusers computes in float32."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    start = [i.name for i in graph.input if i.name in FP32_EMBEDDING_INPUTS]
    seen, blocked, todo = set(start), [], deque(start)
    while todo:
        for n in consumers.get(todo.popleft(), []):
            if n.op_type in LINEAR_OPS or n.name in blocked:
                continue
            blocked.append(n.name)
            for o in n.output:
                if o not in seen:
                    seen.add(o)
                    todo.append(o)
    return blocked


# ---------------------------------------------------------------------------------------------------------------
# LoRA map: where each torch Linear/Conv2d weight lives among the ONNX initializers (src/pipeline/lora-map.ts reads
# it). Found by value: each weight is compared with the initializers of a matching size under the layouts the
# exporters produce (same, transposed, OHWI, packed Q/K/V or K/V interleaved per head), and each match is checked
# element for element. A weight found nowhere is listed as unmapped, so an adapter that targets it gets a clear error.

def lora_targets(module) -> dict:
    """torch parameter name -> weight (numpy, the module's dtype) of every Linear and Conv2d of `module`."""
    import torch
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(m, "weight", None) is not None:
            out[f"{name}.weight"] = m.weight.detach().cpu().numpy()
    return out


def _row_major(shape):
    strides, acc = [], 1
    for d in reversed(shape):
        strides.insert(0, acc)
        acc *= d
    return strides


def _candidate_views(w_shape, init_shape, init_size):
    """(view shape, strides, offset) candidates placing a torch weight of `w_shape` in an initializer."""
    import math
    n = math.prod(w_shape)
    out, inner = w_shape[0], n // w_shape[0]
    if init_size == n:
        yield list(w_shape), _row_major(w_shape), 0  # same layout (Conv OIHW, Gemm transB)
        yield [out, inner], [1, out], 0  # Linear -> MatMul [in, out]; a 1x1 conv as a MatMul
        if len(w_shape) == 4:
            o, i, kh, kw = w_shape
            yield [o, i, kh, kw], [kh * kw * i, 1, kw * i, i], 0  # NhwcConv OHWI
    if len(w_shape) == 2 or (len(w_shape) == 4 and w_shape[2:] == (1, 1)):
        for k in (2, 3):
            if init_size != k * n or len(init_shape) != 2 or init_shape[0] != inner:
                continue
            # onnxruntime's packed weights: [in, n_heads, k, head] (dstack of the per-head reshapes), or [in, k, out].
            for heads in [d for d in range(1, out + 1) if out % d == 0]:
                h = out // heads
                for j in range(k):
                    yield [heads, h, inner], [k * h, 1, k * out], j * h


def _view_index(vshape, strides, offset, positions=None):
    """Flat initializer indices of a view: of every element, or of the view's flat `positions` only."""
    import numpy as np
    if positions is not None:
        return offset + sum(i * st for i, st in zip(np.unravel_index(positions, vshape), strides))
    idx = np.full(vshape, offset, dtype=np.int64)
    for d, (dim, st) in enumerate(zip(vshape, strides)):
        shape = [1] * len(vshape)
        shape[d] = dim
        idx = idx + (np.arange(dim, dtype=np.int64) * st).reshape(shape)
    return idx.reshape(-1)


def build_lora_map(targets: dict, graph, prefilter: bool = True) -> tuple[dict, list]:
    """Matches each target weight to an initializer of `graph` (values compared exactly, in the weight's dtype).

    A UNet has dozens of initializers of each size and each is tried under several layouts: `prefilter` compares 16
    spread elements first and builds a candidate's full index only when they all match (the map is the same)."""
    import math
    import numpy as np
    from onnx import numpy_helper
    by_size: dict[int, list] = {}
    arrays = {}
    for t in graph.initializer:
        if t.data_type not in (1, 10):  # float, float16
            continue
        size = math.prod(t.dims)
        by_size.setdefault(size, []).append(t)
    def array(t):
        if t.name not in arrays:
            arrays[t.name] = numpy_helper.to_array(t).reshape(-1)
        return arrays[t.name]
    weights, unmapped, used = {}, [], set()
    for name, w in targets.items():
        n = w.size
        flat_w = w.reshape(-1)
        probe = np.unique(np.linspace(0, n - 1, 16).astype(np.int64))
        found = None
        for size in (n, 2 * n, 3 * n):
            for t in by_size.get(size, []):
                a = array(t)
                if a.dtype != flat_w.dtype:
                    continue
                for vshape, strides, offset in _candidate_views(tuple(w.shape), tuple(t.dims), size):
                    if (t.name, offset, tuple(strides)) in used:
                        continue
                    if prefilter:
                        at = _view_index(vshape, strides, offset, probe)
                        if at.max() >= size or not np.array_equal(a[at], flat_w[probe]):
                            continue
                    idx = _view_index(vshape, strides, offset)
                    if idx.max() < size and np.array_equal(a[idx], flat_w):
                        found = {"initializer": t.name, "shape": list(w.shape), "view": {"shape": vshape, "strides": strides, "offset": offset}}
                        used.add((t.name, offset, tuple(strides)))
                        break
                if found:
                    break
            if found:
                break
        if found:
            weights[name] = found
        else:
            unmapped.append(name)
    return weights, unmapped


def check_lora_map(weights: dict, targets: dict, graph) -> list:
    """After the float16 conversion: each mapped weight must still be where the map says (float16 of its value)."""
    import numpy as np
    from onnx import numpy_helper
    inits = {t.name: t for t in graph.initializer}
    bad = []
    for name, e in weights.items():
        t = inits.get(e["initializer"])
        if t is None:
            bad.append(f"{name} ({e['initializer']} is gone)")
            continue
        a = numpy_helper.to_array(t).reshape(-1).astype(np.float32)
        v = e["view"]
        idx = _view_index(v["shape"], v["strides"], v["offset"])
        w = targets[name].reshape(-1)
        if t.data_type == 10 and w.dtype != np.float16:
            # onnxruntime's conversion, which clamps magnitudes below float16's smallest subnormal up to it.
            from onnxruntime.transformers.float16 import convert_np_to_float16
            w = convert_np_to_float16(w.astype(np.float32))
        want = w.astype(np.float32)
        if not np.array_equal(a[idx], want):
            bad.append(f"{name} ({e['initializer']} holds other values)")
    return bad


def _write_lora_map(folder: Path, component: str, weights: dict, unmapped: list):
    (folder / LORA_MAP).write_text(json.dumps({"format": LORA_MAP_FORMAT, "component": component, "producer": "diffusers-runtime scripts/export_sd.py",
                                               "weights": weights, "unmapped": unmapped}) + "\n")


def _op_counts(model_proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model_proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _numpy2_vae_attention_shim():
    """onnxruntime's VAE attention fusion reads the head count with int() of a one-element 1-D array, which numpy
    2 refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars). Give that one call 0-d
    constants; everything else sees the values unchanged."""
    import importlib
    import numpy as np
    import onnxruntime.transformers.optimizer  # noqa: F401 - puts the package folder on sys.path, as it imports itself
    # The optimizer imports this module under its bare name too: patch every copy.
    for mod in {importlib.import_module(n) for n in ("onnxruntime.transformers.fusion_attention_vae", "fusion_attention_vae")}:
        cls = mod.FusionAttentionVae
        orig = cls.get_num_heads_and_hidden_size
        if getattr(orig, "_shimmed", False):
            continue

        def patched(self, reshape_q, add_q, orig=orig):
            get = self.model.get_constant_value

            def scalar_ok(name):
                v = get(name)
                return v.reshape(()) if isinstance(v, np.ndarray) and v.size == 1 else v
            self.model.get_constant_value = scalar_ok
            try:
                return orig(self, reshape_q, add_q)
            finally:
                del self.model.get_constant_value
        patched._shimmed = True
        cls.get_num_heads_and_hidden_size = patched


def _fuse(src: Path, model_type: str, fp16: bool, keep_fp32_ops: list[str], report: dict, targets: dict | None = None):
    """The optimized (and float16) graph, and the LoRA map of `targets` found in it (None without targets)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    _numpy2_vae_attention_shim()

    def run(attention: bool):
        fo = FusionOptions(model_type)
        if model_type == "unet":
            # Packed QKV/KV layouts only pay (and only exist) for the float16 kernels.
            fo.enable_packed_kv = fp16
            fo.enable_packed_qkv = fp16
            fo.enable_bias_add = True
        if not attention:
            fo.enable_attention = False
        return optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                              optimization_options=fo, use_gpu=True, only_onnxruntime=False)

    try:
        m = run(True)
        report["attention_fusion"] = True
    except Exception as e:  # noqa: BLE001 - onnxruntime 1.30's VAE attention fusion raises on diffusers >= 0.30 exports
        if model_type != "vae":
            raise
        log(f"{src.parent.name}: attention fusion failed ({type(e).__name__}: {str(e)[:120]}); fusing without it")
        report["attention_fusion"] = False
        report["attention_fusion_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        m = run(False)
    report["fused_ops"] = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    # Before the float16 conversion, while the fused weights still hold the traced float32 values exactly.
    lora = build_lora_map(targets, m.model.graph) if targets is not None else None
    if fp16:
        nodes = fp32_embedding_nodes(m.model.graph)
        m.convert_float_to_float16(keep_io_types=True, op_block_list=keep_fp32_ops or None, node_block_list=nodes or None)
        report["fp32_nodes"] = len(nodes)
        if keep_fp32_ops:
            report["fp32_ops"] = keep_fp32_ops
    m.topological_sort()
    return m.model, lora


def export_pipeline(pipe, out_dir, *, fused=True, fp16=True, device="cuda", opset=17, vae_encoder=True, source=None):
    """Exports `pipe` (a diffusers StableDiffusion[XL]Pipeline, weights in float32 unless plain fp16) into out_dir.
    `source`, where given, is recorded in the manifest (what a single-file checkpoint was loaded as).
    Returns the manifest it wrote."""
    import torch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    t_all = time.perf_counter()
    if fused:
        from diffusers.models.attention_processor import AttnProcessor
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
        for te in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")):
            if te is not None:  # transformers' SDPA path traces to a graph the CLIP attention fusion does not match
                te.set_attn_implementation("eager") if hasattr(te, "set_attn_implementation") else setattr(te.config, "_attn_implementation", "eager")
        dtype = torch.float32  # fused graphs are converted to fp16 after the fusions, which match fp32 patterns
    else:
        dtype = torch.float16 if fp16 else torch.float32
    for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "unet", "vae")):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    manifest = {"format": FORMAT, "producer": "diffusers-runtime scripts/export_sd.py", "variant": "fused" if fused else "plain",
                "target": "cuda" if fused else "any", "pipeline": type(pipe).__name__, "opset": opset, "versions": versions(), "components": {}}
    if source:
        manifest["source"] = source
    want_encoder = vae_encoder and getattr(pipe.vae, "encoder", None) is not None
    for name, module, args, inames, onames, axes, model_type in _component_specs(pipe, device, dtype, want_encoder):
        t0 = time.perf_counter()
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        report = {}
        upcast_vae = name.startswith("vae") and xl and bool(getattr(pipe.vae.config, "force_upcast", False))
        comp_fp16 = fp16 and not upcast_vae
        traced_fp32 = False
        if not fused and dtype == torch.float16 and model_type == "clip":
            # transformers' CLIP traced in float16 gives a LayerNormalization with float and float16 operands, which
            # ONNX Runtime refuses to load; the text encoder is small, so the plain export keeps it in float32.
            module.m.to(torch.float32)
            traced_fp32 = True
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            raw = Path(tmp) / "model.onnx"
            _torch_export(module, args, raw, inames, onames, axes, opset)
            # LoRA adapters patch the UNet and the text encoders (diffusers' load_lora_weights targets).
            targets = lora_targets(module.m) if name in ("unet", "text_encoder", "text_encoder_2") else None
            if fused:
                keep = ["MultiHeadAttention", "Attention"] if name == "unet" and getattr(pipe.unet.config, "upcast_attention", False) else []
                proto, lora = _fuse(raw, model_type, comp_fp16, keep, report, targets)
            else:
                import onnx
                proto = onnx.load(str(raw), load_external_data=True)
                lora = build_lora_map(targets, proto.graph) if targets is not None else None
            if lora is not None:
                weights, unmapped = lora
                moved = check_lora_map(weights, targets, proto.graph)
                if moved:
                    raise SystemExit(f"export_sd: {name}: {len(moved)} LoRA map entries do not hold their weights after the conversion: {moved[:5]}")
                report["lora_map"] = {"weights": len(weights), "unmapped": len(unmapped)}
                if unmapped:
                    log(f"{name}: {len(unmapped)} Linear/Conv2d weights not found among the initializers (adapters cannot patch them): {unmapped[:5]}")
        report["dtype"] = "float16" if (comp_fp16 if fused else dtype == torch.float16 and not traced_fp32) else "float32"
        if traced_fp32:
            report["fp32_reason"] = "CLIP traced in float16 does not load in ONNX Runtime (mixed-type LayerNormalization)"
        if upcast_vae and fp16:
            report["fp32_reason"] = "vae config force_upcast (SDXL VAE overflows in float16)"
        report["cuda_only_ops"] = {k: v for k, v in _op_counts(proto).items() if k in CUDA_ONLY_OPS}
        report["files"] = _save(proto, folder)
        if lora is not None:
            _write_lora_map(folder, name, *lora)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        manifest["components"][name] = report
        log(name, json.dumps({k: v for k, v in report.items() if k != "files"}))
        del proto
    _write_configs(pipe, out)
    manifest["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_configs(pipe, out: Path):
    """model_index.json, scheduler, tokenizers and each component's config.json, as optimum lays them out."""
    def dump(cfg, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # _name_or_path is where the source was loaded from (a local path on the exporting machine): not the export's.
        cfg = {k: v for k, v in dict(cfg).items() if k != "_name_or_path"}
        path.write_text(json.dumps(cfg, indent=1, default=str, allow_nan=True) + "\n")
    index = {k: v for k, v in dict(pipe.config).items() if not isinstance(v, (list, tuple)) or k.startswith("_")}
    index["_class_name"] = type(pipe).__name__
    dump(index, out / "model_index.json")
    pipe.scheduler.save_pretrained(str(out / "scheduler"))
    for t in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, t, None)
        if tok is not None:
            tok.save_pretrained(str(out / t))
            _bpe_files(out / t)
    for name, m in (("text_encoder", getattr(pipe, "text_encoder", None)), ("text_encoder_2", getattr(pipe, "text_encoder_2", None)), ("unet", pipe.unet)):
        if m is not None:
            dump(m.config.to_dict() if hasattr(m.config, "to_dict") else m.config, out / name / "config.json")
    for name in ("vae_decoder", "vae_encoder"):
        if (out / name).is_dir():
            dump(pipe.vae.config, out / name / "config.json")


def _bpe_files(folder: Path):
    """vocab.json and merges.txt, which the runtime's tokenizer reads: transformers 5 saves only tokenizer.json."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"export_sd: {folder.name}/tokenizer.json is not a BPE tokenizer")
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (the original CompVis / SGM layout: model.diffusion_model.*, first_stage_model.*,
# cond_stage_model.* or conditioner.embedders.*), loaded with diffusers' from_single_file.

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
# diffusers' model type (infer_diffusers_model_type) -> the pipeline class that serves it here.
SINGLE_FILE_TYPES = {"v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline",
                     "inpainting_v2": "StableDiffusionInpaintPipeline", "xl_base": "StableDiffusionXLPipeline",
                     "xl_inpaint": "StableDiffusionXLInpaintPipeline"}
# Pipeline classes a --config may name: the families the runtime serves.
SINGLE_FILE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline", "LatentConsistencyModelPipeline",
                       "LatentConsistencyModelImg2ImgPipeline")
# What diffusers' from_single_file fetches of a hub config (single_file.py, _download_diffusers_model_config_from_hub).
CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]
LAYOUT_HELP = ("a single-file Stable Diffusion checkpoint in the original layout: model.diffusion_model.* (UNet), first_stage_model.* (VAE) "
               "and cond_stage_model.* (SD 1.x/2.x) or conditioner.embedders.* (SDXL) (text encoders)")


class SourceError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"export_sd: {msg}")


def is_single_file(source: str) -> bool:
    return source.lower().endswith(SAFETENSORS_EXT + PICKLE_EXT) or os.path.isfile(source)


def checkpoint_shapes(path: str, allow_pickle: bool) -> dict:
    """key -> shape of every tensor in the checkpoint, read without loading a safetensors file's weights."""
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise SourceError(f"{path} is not a file (a diffusers folder needs model_index.json; a single-file checkpoint is one .safetensors file)")
    lower = name.lower()
    if lower.endswith(PICKLE_EXT):
        if not allow_pickle:
            raise SourceError(f"{name} is a Python pickle: loading a pickle can run code hidden in the file. Prefer the model's .safetensors "
                              "file; if you trust this one, pass --allow-pickle (it is then read with torch.load(weights_only=True), as "
                              "diffusers reads it, which refuses objects other than tensors and plain containers)")
        import pickle
        import zipfile
        import torch
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            raise SourceError(f"{name}: torch's weights-only loader refused it ({str(e).splitlines()[0][:200]}): it holds objects other "
                              "than tensors (training state). Convert it to .safetensors where you trust it, and export that") from None
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise SourceError(f"{name} is not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:160]}); expected {LAYOUT_HELP}") from None
        while isinstance(sd, dict) and "state_dict" in sd:  # as diffusers' load_single_file_checkpoint unwraps it
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise SourceError(f"{name} holds a {type(sd).__name__}, not a state dict; expected {LAYOUT_HELP}")
        return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        kind = "" if lower.endswith(SAFETENSORS_EXT) else " (single-file checkpoints are .safetensors, or .ckpt with --allow-pickle)"
        raise SourceError(f"{name} is not a safetensors file{kind}: {type(e).__name__}: {str(e)[:160]}") from None


def check_layout(name: str, shapes: dict):
    """The original layout's three parts, or an error saying what the file looks like instead."""
    keys = list(shapes)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    if not has("model.diffusion_model."):
        if any("lora" in k.lower() for k in keys):
            what = " It looks like a LoRA adapter: serve it on its base model (docs/LORA.md)."
        elif has("down_blocks.", "encoder.down_blocks.", "decoder.up_blocks.", "text_model.", "embeddings."):
            what = " It looks like one diffusers component's weights: export the whole diffusers folder (model_index.json beside it)."
        elif has("encoder.down.", "decoder.up."):
            what = " It looks like a VAE on its own: such a file replaces a model's VAE; it is not a model."
        else:
            what = ""
        raise SourceError(f"{name} is not {LAYOUT_HELP}; it has {len(keys)} tensors ({sample or 'none'}).{what}")
    missing = [part for part, pre in (("first_stage_model.* (VAE)", ("first_stage_model.",)),
                                      ("cond_stage_model.* or conditioner.embedders.* (text encoders)", ("cond_stage_model.", "conditioner.embedders.")))
               if not has(*pre)]
    if missing:
        raise SourceError(f"{name} has a UNet (model.diffusion_model.*) but no {' and no '.join(missing)}: a UNet-only file. Export needs "
                          "the whole pipeline in one file, or a diffusers folder")


def infer_model_type(shapes: dict) -> str | None:
    """diffusers' model type for the checkpoint, or None where diffusers would only guess: its inference falls back to
    'v1' for any layout it does not recognise, so 'v1' counts only with SD 1.x's UNet (its last output block)."""
    import torch
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    t = infer_diffusers_model_type(meta)
    if t == "v1" and CHECKPOINT_KEY_NAMES["v1"] not in shapes:
        return None
    return t


def _is_xl_layout(shapes: dict) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in shapes)


def _config_dir(config: str, why: str) -> str:
    """A local folder holding the configs of `config` (a folder, or a hub id fetched as diffusers fetches it)."""
    if os.path.isdir(config):
        if not os.path.isfile(os.path.join(config, "model_index.json")):
            raise SourceError(f"--config {os.path.basename(os.path.normpath(config))}: no model_index.json there; --config wants a diffusers "
                              "folder (model_index.json, scheduler/, tokenizer*/, unet/config.json, ...; weights are not needed) or a hub id")
        return config
    if config.count("/") != 1 or config.startswith((".", "/")):
        raise SourceError(f"--config {config}: neither a local folder nor a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(config, allow_patterns=CONFIG_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline, unreachable, gated, unknown: all end the same way
        raise SourceError(f"the configs of {config} ({why}) could not be fetched from the Hugging Face Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}). Pass --config a local diffusers folder of the same "
                          f"architecture (a copy of {config} without its weights is enough: model_index.json and the json/txt files "
                          "of its subfolders)") from None


def load_single_file(path: str, config: str | None = None, allow_pickle: bool = False):
    """The pipeline of a single-file checkpoint, in float32, and what was inferred (for the manifest)."""
    import diffusers
    import torch
    name = os.path.basename(path)
    shapes = checkpoint_shapes(path, allow_pickle)
    check_layout(name, shapes)
    model_type = infer_model_type(shapes)
    xl = _is_xl_layout(shapes)
    if config is None:
        if model_type is None:
            family = "SDXL-like (conditioner.embedders.*)" if xl else "SD 1.x/2.x-like (cond_stage_model.*)"
            raise SourceError(f"cannot infer the model type of {name} without --config: its layout is {family} but not one diffusers "
                              "recognises by its keys (a non-standard architecture). Pass --config a diffusers folder or hub id of the "
                              "same architecture")
        if model_type not in SINGLE_FILE_TYPES:
            raise SourceError(f"{name} is a '{model_type}' checkpoint (as diffusers infers it); the runtime serves SD 1.x/2.x, SDXL base and "
                              f"their inpainting variants ({', '.join(SINGLE_FILE_TYPES)})")
        from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
        hub_id = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
        cfg_dir = _config_dir(hub_id, f"diffusers' layout of a '{model_type}' checkpoint, which {name} was inferred to be")
        cls_name = SINGLE_FILE_TYPES[model_type]
        config_label = hub_id
    else:
        cfg_dir = _config_dir(config, "given with --config")
        config_label = config if not os.path.isdir(config) else "a local folder"
        index = json.loads(Path(cfg_dir, "model_index.json").read_text())
        cls_name = index.get("_class_name", "")
        if cls_name not in SINGLE_FILE_CLASSES:
            raise SourceError(f"--config is a {cls_name or 'pipeline without _class_name'}; the runtime serves {', '.join(SINGLE_FILE_CLASSES)}")
        if index.get("text_encoder", [None])[0] is None:
            raise SourceError("--config has no text_encoder: an SDXL refiner, which the runtime does not serve")
        if ("XL" in cls_name) != xl:
            raise SourceError(f"--config is a {cls_name} but {name} has the {'SDXL' if xl else 'SD 1.x/2.x'} layout "
                              f"({'conditioner.embedders.*' if xl else 'cond_stage_model.*'}): pass a config of the same architecture")
    log(f"{name}: {'model type ' + model_type if model_type else 'model type not inferred'}; {cls_name} with the configs of {config_label}")
    cls = getattr(diffusers, cls_name)
    try:
        pipe = cls.from_single_file(path, config=cfg_dir, torch_dtype=torch.float32, safety_checker=None)
    except Exception as e:  # noqa: BLE001 - shape mismatches, missing components: diffusers raises several kinds
        raise SourceError(f"{name} does not load as a {cls_name} with the configs of {config_label} ({type(e).__name__}: "
                          f"{str(e)[:300]}): is --config of the same architecture?") from None
    return pipe, {"single_file": name, "model_type": model_type, "pipeline_class": cls_name, "config": config_label}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="Hugging Face model id, local diffusers folder, or single-file checkpoint (.safetensors, .ckpt)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--plain", action="store_true", help="unfused graphs for any execution provider (CPU serving)")
    ap.add_argument("--fp32", action="store_true", help="keep float32 weights")
    ap.add_argument("--device", default=None, help="torch device for tracing (default: cuda if available, else cpu)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--no-vae-encoder", action="store_true", help="skip vae_encoder (text-to-image only)")
    ap.add_argument("--config", default=None, help="single file: diffusers folder or hub id of the same architecture (configs, tokenizers, scheduler)")
    ap.add_argument("--allow-pickle", action="store_true", help="single file: accept a .ckpt (a pickle; loading one can run code)")
    a = ap.parse_args(argv)
    single = is_single_file(a.source)
    if not single and (a.config or a.allow_pickle):
        sys.exit("export_sd: --config and --allow-pickle are for single-file checkpoints (.safetensors, .ckpt)")
    import torch
    from diffusers import DiffusionPipeline
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fp16 = not a.fp32
    if a.plain and fp16 and device != "cuda":
        sys.exit("export_sd: a plain float16 export traces in float16 and needs --device cuda (or use --fp32)")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"export_sd: {out} is not empty")
    log(f"loading {a.source}")
    source = None
    if single:
        pipe, source = load_single_file(a.source, a.config, a.allow_pickle)
    else:
        # The safety checker is not part of the layout: not loading it saves memory and time.
        pipe = DiffusionPipeline.from_pretrained(a.source, torch_dtype=torch.float32, safety_checker=None)
    m = export_pipeline(pipe, out, fused=not a.plain, fp16=fp16, device=device, opset=a.opset, vae_encoder=not a.no_vae_encoder, source=source)
    log(f"done in {m['seconds']} s: {out} ({m['variant']}, target {m['target']})")


if __name__ == "__main__":
    main()
