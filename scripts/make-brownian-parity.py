"""Writes test/fixtures/parity/brownian.json: the pieces of diffusers' DPMSolverSDEScheduler noise, made by the real
libraries: numpy's SeedSequence states, Python's round(x, 6), torch's float32 exp / log / expm1 (SLEEF on x86-64),
and torchsde's BrownianInterval increments as diffusers' BatchedBrownianTree builds the interval.

    git -C <torchsde mirror> archive HEAD torchsde | tar x -C /tmp/torchsde-src
    PYTHONPATH=/tmp/torchsde-src:scripts/parity-shims /usr/bin/python3 scripts/make-brownian-parity.py test/fixtures/parity/brownian.json

scripts/parity-shims/trampoline.py stands in for the PyPI `trampoline` package torchsde imports (control flow only).
Made with Debian's python3-torch 1.13.1 and numpy 1.24 (x86-64, AVX2), as the scheduler cases.
"""
import json
import sys

import numpy as np
import torch
import torchsde
from parity_json import F32, dumps

out_path = sys.argv[1]
rng = np.random.default_rng(20261205)


def f32_list(t):
    return [F32(v) for v in t.flatten().tolist()]


# 1. SeedSequence: entropies of 1-3 words (seeds up to 2**53 - 1 reach two), with and without spawn keys.
entropies = [0, 1, 7000, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 5, 2**53 - 1, 123456789012345, 2**64 + 7]
entropies += [int(x) for x in rng.integers(0, 2**32, 10)] + [int(x) for x in rng.integers(2**32, 2**53, 10)]
spawn_keys = [(), (0, 0), (1, 1), (5, 3), (2**24 + 3, 25), (2**33 + 1, 34)]
seed_sequence = []
for e in entropies:
    for key in spawn_keys:
        for pool in (4, 24):
            n = 4 if key else 3
            state = np.random.SeedSequence(entropy=e, spawn_key=key, pool_size=pool).generate_state(n)
            seed_sequence.append({"entropy": str(e), "spawn_key": [str(k) for k in key], "pool_size": pool, "state": [int(v) for v in state]})
for pool in (4, 8):
    seed_sequence.append({"entropy": "99", "spawn_key": [], "pool_size": pool,
                          "state": [int(v) for v in np.random.SeedSequence(99, pool_size=pool).generate_state(10)]})

# 2. round(x, 6): dyadic ties (x·10^6 exactly k + 1/2 breaks to even), near-ties, and sigma-like values.
rounds = [1 / 128, 3 / 128, 5 / 128, 0.0000005, 0.0000015, 2.5e-6, 14.6146392822265625, 0.0291675343364477157592773,
          -1 / 128, 123.4567895, 1e-7, 7.3218955, 0.5 * (14.614639 + 0.029168)]
rounds += [float(x) for x in rng.random(200) * 20]
rounds += [float(np.float32(x)) for x in rng.random(200) * 15]
rounds += [k / 2**m for k, m in zip(rng.integers(1, 2**20, 100), rng.integers(7, 30, 100))]
py_round = [[x, round(x, 6)] for x in rounds]

# 3. torch's float32 exp, log, expm1 (CPU); the bit patterns, so -0 and every last bit survive.
def bits(t):
    return t.contiguous().view(torch.int32).tolist()

xs = torch.from_numpy(np.concatenate([rng.random(1500) * 40 - 20, rng.random(500) * 0.2 - 0.1, -np.log(rng.random(500) * 14.6 + 0.02)]).astype(np.float32))
pos = torch.from_numpy(np.concatenate([rng.random(1500) * 30, rng.random(500) * 1e-3, np.exp(rng.random(500) * 160 - 80)]).astype(np.float32))
torch_math = {"exp_in": bits(xs), "exp": bits(xs.exp()), "expm1": bits(xs.expm1()), "log_in": bits(pos), "log": bits(pos.log())}

# 4. BrownianInterval as BatchedBrownianTree makes it, queried in the order given.
def brownian_case(t0, t1, shape, entropy, queries):
    t0, t1 = float(np.float32(t0)), float(np.float32(t1))
    bm = torchsde.BrownianInterval(t0=torch.as_tensor(t0), t1=torch.as_tensor(t1), size=shape, dtype=torch.float32, device="cpu",
                                   entropy=entropy, tol=1e-6, pool_size=24, halfway_tree=True)
    rec = []
    for ta, tb in queries:
        ta, tb = float(np.float32(ta)), float(np.float32(tb))
        rec.append({"ta": ta, "tb": tb, "w": f32_list(bm(ta, tb))})
    return {"t0": t0, "t1": t1, "shape": list(shape), "entropy": str(entropy), "queries": rec}


sd_min, sd_max = 0.029167533, 14.614642
sched = [float(x) for x in np.exp(np.linspace(np.log(sd_max), np.log(sd_min), 8))]
stepwise = []
for a, b in zip(sched[:-1], sched[1:]):
    mid = float(np.exp(0.5 * (np.log(a) + np.log(b))))
    stepwise += [(mid, a), (b, a)]
randoms = [tuple(sorted(rng.uniform(sd_min, sd_max, 2))) for _ in range(12)]
edges = [(sd_min, sd_max), (sd_min, 1.0), (2.0, sd_max), (1e-3, 0.5), (3.0, 99.0), (4.0, 4.0)]
brownian = [
    brownian_case(sd_min, sd_max, (1, 4, 2, 2), 7000, stepwise + randoms + edges),
    brownian_case(sd_min, sd_max, (4, 8, 8), 2**40 + 3, stepwise[::-1] + randoms),
    brownian_case(sd_min, sd_max, (5,), 0, randoms[:6] + edges),
    brownian_case(0.1, 80.0, (2, 4, 3, 3), 123456789, [tuple(sorted(rng.uniform(0.1, 80.0, 2))) for _ in range(10)]),
]

doc = {"torch": torch.__version__, "numpy": np.__version__, "torchsde": torchsde.__version__, "seed_sequence": seed_sequence,
       "py_round": py_round, "torch_math": torch_math, "brownian": brownian}
with open(out_path, "w") as fh:
    fh.write(dumps(doc) + "\n")
print(len(seed_sequence), len(py_round), len(brownian), file=sys.stderr)
