"""Writes test/fixtures/parity/beta-ppf.json: scipy.stats.beta.ppf on a dense table, what the runtime's betaPpf
(src/pipeline/schedulers/beta-ppf.ts) is held to.

    python scripts/make-beta-ppf.py test/fixtures/parity/beta-ppf.json

diffusers' `_convert_to_beta` (every class with `use_beta_sigmas`) calls `scipy.stats.beta.ppf(t, 0.6, 0.6)` for
each t of `1 - np.linspace(0, 1, n)`: those points for n = 1 to 200 and some larger n, a uniform grid of 4097
points and the tails (1e-k and 1 - 1e-k) go in for alpha = beta = 0.6; other shapes (no diffusers class passes
them) get a coarser grid, to show the inverse is not tuned to 0.6. Beside scipy's value, `exact` is the true
quantile rounded to float64: Newton's method on mpmath's regularized incomplete beta at 200 bits, from scipy's value.
Values are written as Python's repr (shortest round-trip), so the test reads the same doubles. Needs numpy, scipy and
mpmath (~10 minutes).
"""
import json
import sys

import mpmath
import numpy as np
import scipy
import scipy.stats

mpmath.mp.prec = 200


def diffusers_points(counts):
    out = set()
    for n in counts:
        out.update(float(t) for t in 1 - np.linspace(0, 1, n))
    return out


def tails():
    out = set()
    for k in range(1, 17):
        out.add(10.0 ** -k)
        out.add(1 - 10.0 ** -k)
    return out


def exact(q, a, b, start):
    if q in (0.0, 1.0):
        return q
    a, b, q = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(q)
    scale = mpmath.beta(a, b)
    lo, hi = mpmath.mpf(0), mpmath.mpf(1)
    # scipy's value may round to 0 or 1 where the true one lies just inside
    x = min(max(mpmath.mpf(start), mpmath.mpf(2) ** -1100), 1 - mpmath.mpf(2) ** -100)
    for _ in range(200):
        fx = mpmath.betainc(a, b, 0, x, regularized=True) - q
        if fx < 0:
            lo = x
        else:
            hi = x
        nxt = x - fx / (x ** (a - 1) * (1 - x) ** (b - 1) / scale)
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2
        if abs(nxt - x) < x * mpmath.mpf(2) ** -120:
            return float(nxt)
        x = nxt
    raise RuntimeError(f"no convergence at q={q}, a={a}, b={b}")


def table(a, b, points):
    qs = sorted(points)
    ppf = [float(scipy.stats.beta.ppf(q, a, b)) for q in qs]
    return {"alpha": a, "beta": b, "q": qs, "ppf": ppf, "exact": [exact(q, a, b, x) for q, x in zip(qs, ppf)]}


main_points = diffusers_points(list(range(1, 201)) + [250, 256, 300, 333, 500, 512, 750, 999, 1000])
main_points |= {k / 4096 for k in range(4097)} | tails()
other_points = {k / 256 for k in range(257)} | tails()
shapes = [(0.5, 0.5), (0.6, 0.8), (0.3, 1.7), (1.0, 1.0), (2.0, 3.0), (5.0, 0.9), (0.1, 0.1), (12.0, 12.0)]
out = {
    "scipy": scipy.__version__,
    "numpy": np.__version__,
    "mpmath": mpmath.__version__,
    "python": sys.version.split()[0],
    "tables": [table(0.6, 0.6, main_points)] + [table(a, b, other_points) for a, b in shapes],
}
with open(sys.argv[1], "w") as fh:
    json.dump(out, fh, separators=(",", ":"))
    fh.write("\n")
print(sum(len(t["q"]) for t in out["tables"]), "values", file=sys.stderr)
