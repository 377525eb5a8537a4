"""Times export_sd.build_lora_map on an SD 1.5-size UNet (random weights, diffusers' own class) exported to ONNX on the
CPU: the full-index search against the one that compares 16 spread elements first, side by side in one process, and
checks both give the same map.

    PYTHONPATH=DIFFUSERS_SRC/src:scripts python scripts/bench_lora_map.py [--channels 320,640,1280,1280]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import export_sd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", default="320,640,1280,1280", help="the UNet's block_out_channels (SD 1.5: 320,640,1280,1280)")
    a = ap.parse_args()
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(int(c) for c in a.channels.split(",")),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval()
    _, Unet, _, _ = export_sd._wrappers()
    args = (torch.randn(2, 4, 8, 8), torch.tensor(999.0), torch.randn(2, 77, 768))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        export_sd._torch_export(Unet(unet, False, False), args, path, ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                                {"sample": {0: "b", 2: "h", 3: "w"}}, 17)
        print(f"exported in {time.perf_counter() - t:.1f} s", flush=True)
        graph = onnx.load(str(path), load_external_data=True).graph
    targets = export_sd.lora_targets(unet)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    times, maps = {}, {}
    for prefilter in (True, False):
        t = time.perf_counter()
        maps[prefilter] = export_sd.build_lora_map(targets, graph, prefilter=prefilter)
        times[prefilter] = time.perf_counter() - t
        print(f"prefilter={prefilter}: {times[prefilter]:.1f} s, {len(maps[prefilter][0])} weights mapped, {len(maps[prefilter][1])} unmapped", flush=True)
    same = maps[True] == maps[False]
    print(f"UNet {params:.1f} M parameters, {len(targets)} Linear/Conv2d weights: full index {times[False]:.1f} s, "
          f"16-element prefilter {times[True]:.1f} s, ratio {times[True] / times[False]:.3f}; same map: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
