"""Imported before diffusers by the scripts that run its schedulers on Debian's torch 1.13: that torch lacks device
modules (xpu, mps, mtia) diffusers' utils name at import, which no scheduler uses. A stand-in for each one missing,
none for those a torch 2.x has."""
import types

import torch

for _dev in ("xpu", "mps", "mtia"):
    if not hasattr(torch, _dev):
        setattr(torch, _dev, types.SimpleNamespace(empty_cache=lambda: None, device_count=lambda: 0, is_available=lambda: False,
                                                   synchronize=lambda *a, **k: None, manual_seed=lambda *a: None,
                                                   reset_peak_memory_stats=lambda *a: None, max_memory_allocated=lambda *a: 0,
                                                   current_device=lambda: 0))
