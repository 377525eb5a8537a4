"""What the parity generators (make-scheduler-parity.py, make-brownian-parity.py) write their JSON with: float32 values
in the fewest digits that read back to the same float32, the rest as Python's json writes it (NaN and Infinity too)."""
import json

import numpy as np


class F32(float):
    """A float32 value, written with the fewest digits that read back to the same float32 (keeps the files small)."""

    def __repr__(self):
        return str(np.float32(self))


def dumps(v):
    """json.dumps, with F32 lists written by their repr (json's encoder would write float.__repr__)."""
    if isinstance(v, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + dumps(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    if isinstance(v, F32):
        return repr(v)
    return json.dumps(v, allow_nan=True)
