#!/usr/bin/env python3
"""test/fixtures/lora/sgm-names.json: how diffusers' own conversion (_maybe_map_sgm_blocks_to_diffusers, then
_convert_non_diffusers_lora_to_diffusers, for an SDXL UNet config with layers_per_block 2) names the modules of SDXL
kohya (sd-scripts) LoRA keys, normalised to the torch module names (attention-processor names folded back).

    PYTHONPATH=<diffusers>/src python3 scripts/make_sgm_names.py > test/fixtures/lora/sgm-names.json
"""
import json, re, torch
from types import SimpleNamespace
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers, _convert_non_diffusers_lora_to_diffusers
names = ["input_blocks_0_0", "input_blocks_1_0_in_layers_2", "input_blocks_2_0_out_layers_3", "input_blocks_2_0_emb_layers_1", "input_blocks_3_0_op",
         "input_blocks_4_0_skip_connection", "input_blocks_4_1_proj_in", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
         "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", "input_blocks_7_1_transformer_blocks_0_attn1_to_out_0",
         "middle_block_0_in_layers_2", "middle_block_1_transformer_blocks_3_attn2_to_v", "middle_block_2_emb_layers_1", "middle_block_1_proj_out",
         "output_blocks_0_0_skip_connection", "output_blocks_2_1_transformer_blocks_1_ff_net_2", "output_blocks_2_2_conv", "output_blocks_4_1_proj_in",
         "output_blocks_5_2_conv", "output_blocks_6_0_in_layers_2", "output_blocks_8_0_out_layers_3",
         "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2", "out_2"]
sd = {}
for n in names:
    sd[f"lora_unet_{n}.lora_down.weight"] = torch.zeros(1, 1)
    sd[f"lora_unet_{n}.lora_up.weight"] = torch.zeros(1, 1)
cfg = SimpleNamespace(layers_per_block=2)
out = {}
for n in names:
    one = {k: v for k, v in sd.items() if k.startswith(f"lora_unet_{n}.")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(one), cfg)
    conv, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    k = [k for k in conv if ".down." in k][0]
    m = k[len("unet."):]
    m = re.sub(r"\.(lora\.)?down\.weight$", "", m).replace(".processor", "")
    m = re.sub(r"\.to_(q|k|v)_lora$", r".to_\1", m).replace(".to_out_lora", ".to_out.0")
    out[n] = m
print(json.dumps(out, indent=1))
