#!/usr/bin/env python3
"""test/fixtures/lora/kohya-partial-alpha.json: a kohya file in which only some layers have a `.alpha`, and the scale
(lora_alpha / r) each layer gets when diffusers loads it into PEFT.

The file is test/fixtures/lora/kohya.safetensors with every text encoder alpha set to TE_DEFAULT, then some `.alpha`
tensors removed and a few changed (EDITS, written into the JSON: the test makes the same file from them). The scales
come from diffusers' and PEFT's own functions, taken from their sources by name (Debian's python3 has torch but
not the packages diffusers imports at its top): `_convert_non_diffusers_lora_to_diffusers` (the network alphas),
`convert_unet_state_dict_to_peft` / `convert_state_dict_to_diffusers` + `convert_state_dict_to_peft` (the ranks, as
`load_lora_adapter` and `_load_lora_into_text_encoder` collect them), `get_peft_kwargs` (the LoraConfig) and PEFT's
`get_pattern_key` (which rank and alpha a module takes). Per component, a layer without `.alpha` gets the alpha most
common among the component's layers that have one.

Only non-attention layers get alphas that differ from the most common one: diffusers names the network alpha of a
kohya attention projection after its attention-processor key (`...attn1.processor.to_q_lora.down.weight.alpha`,
`...self_attn.to_q_lora...`), which no PEFT module name matches, so such a layer gets the component's most common alpha
whatever its own is. The script prints those alpha_pattern keys that match no module.

    /usr/bin/python3 scripts/make_lora_partial_alpha.py <diffusers>/src <peft>/src test/fixtures/lora
"""
import ast, collections, enum, json, logging, re, struct, sys, typing
from pathlib import Path

import numpy as np
import torch

diffusers_src, peft_src, fixtures = (Path(a) for a in sys.argv[1:4])


def take(file: Path, names: set, ns: dict) -> None:
    """Runs the top-level functions, classes and assignments named `names` of `file` in `ns`."""
    tree = ast.parse(file.read_text())
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
    missing = names - {n.name if not isinstance(n, ast.Assign) else n.targets[0].id for n in keep}
    if missing:
        sys.exit(f"{file}: no {sorted(missing)}")
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(file), "exec"), ns)


ns = {**vars(typing), "re": re, "torch": torch, "collections": collections, "enum": enum, "logger": logging.getLogger("diffusers")}
take(diffusers_src / "diffusers/utils/state_dict_utils.py", {
    "StateDictType", "UNET_TO_DIFFUSERS", "CONTROL_LORA_TO_DIFFUSERS", "DIFFUSERS_TO_PEFT", "DIFFUSERS_OLD_TO_PEFT",
    "PEFT_TO_DIFFUSERS", "DIFFUSERS_OLD_TO_DIFFUSERS", "PEFT_TO_KOHYA_SS", "PEFT_STATE_DICT_MAPPINGS",
    "DIFFUSERS_STATE_DICT_MAPPINGS", "KOHYA_STATE_DICT_MAPPINGS", "KEYS_TO_ALWAYS_REPLACE", "convert_state_dict",
    "convert_state_dict_to_peft", "convert_state_dict_to_diffusers", "convert_unet_state_dict_to_peft"}, ns)
take(diffusers_src / "diffusers/loaders/lora_conversion_utils.py", {
    "_convert_non_diffusers_lora_to_diffusers", "_convert_unet_lora_key", "_convert_text_encoder_lora_key", "_get_alpha_name"}, ns)
take(diffusers_src / "diffusers/utils/peft_utils.py", {"get_peft_kwargs"}, ns)
take(peft_src / "peft/utils/other.py", {"get_pattern_key"}, ns)

DTYPES = {"F32": np.float32, "F16": np.float16}


def read(file: Path):
    b = file.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = b[8 + n:]
    out = {}
    for k, v in header.items():
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(data[s:e], dtype=DTYPES[v["dtype"]]).reshape(v["shape"]).copy()
    return out, meta


# (kohya layer, alpha): None removes the layer's `.alpha`. UNet alphas are 8 (rank 4), text encoder ones 4.
EDITS = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": None,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": None,
    "lora_unet_mid_block_resnets_0_conv1": None,
    "lora_unet_up_blocks_0_resnets_0_time_emb_proj": None,
    "lora_unet_down_blocks_1_resnets_0_conv1": 2.0,
    "lora_unet_down_blocks_1_resnets_0_conv2": 2.0,
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": 2.0,
    "lora_te1_encoder_layers_0_self_attn_q_proj": None,
    "lora_te1_encoder_layers_1_mlp_fc2": None,
    "lora_te1_encoder_layers_0_mlp_fc1": 6.0,
}
TE_DEFAULT = 2.0  # every other text encoder alpha: not the rank, so a layer without one tells the two rules apart

sd, _ = read(fixtures / "kohya.safetensors")
for k in list(sd):
    if k.startswith("lora_te1_") and k.endswith(".alpha"):
        sd[k] = np.array([TE_DEFAULT], dtype=np.float32)
for layer, alpha in EDITS.items():
    if alpha is None:
        del sd[f"{layer}.alpha"]
    else:
        sd[f"{layer}.alpha"] = np.array([alpha], dtype=np.float32)

state_dict, network_alphas = ns["_convert_non_diffusers_lora_to_diffusers"]({k: torch.from_numpy(v) for k, v in sd.items()})
scales = {}
for prefix, is_unet in (("unet", True), ("text_encoder", False)):
    part = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    alphas = {k[len(prefix) + 1:]: v for k, v in network_alphas.items() if k.split(".")[0] == prefix}
    if is_unet:  # load_lora_adapter
        part = ns["convert_unet_state_dict_to_peft"](part)
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
    else:  # _load_lora_into_text_encoder (its rank keys: the modules named q/k/v/out_proj, fc1, fc2)
        part = ns["convert_state_dict_to_peft"](ns["convert_state_dict_to_diffusers"](part))
        rank = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight")}
    cfg = ns["get_peft_kwargs"](rank, alphas, part, is_unet=is_unet)
    for module in sorted(cfg["target_modules"]):
        r = cfg["rank_pattern"].get(ns["get_pattern_key"](cfg["rank_pattern"].keys(), module), cfg["r"])
        a = cfg["alpha_pattern"].get(ns["get_pattern_key"](cfg["alpha_pattern"].keys(), module), cfg["lora_alpha"])
        scales[f"{prefix}/{module}.weight"] = a / r
    for key in cfg["alpha_pattern"]:
        if not any(re.match(rf"(.*\.)?({key})$", m) for m in cfg["target_modules"]):
            print(f"{prefix}: alpha_pattern key {key!r} matches no module", file=sys.stderr)

(fixtures / "kohya-partial-alpha.json").write_text(json.dumps({
    "made_by": "scripts/make_lora_partial_alpha.py (diffusers' and PEFT's own functions)",
    "edits": {k: v for k, v in EDITS.items()},
    "text_encoder_default_alpha": TE_DEFAULT,
    "scales": scales,
}, indent=1) + "\n")
print(f"{len(scales)} layers", file=sys.stderr)
