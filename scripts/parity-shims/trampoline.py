"""A stand-in for the PyPI package `trampoline` (not installable on the machine that makes the fixtures), which
torchsde's BrownianInterval imports to walk its interval tree without deep recursion. Only control flow: it decides
the order in which torchsde's generators run, never a value they compute.

- `trampoline(gen)` runs the generator `gen` to completion and returns its return value;
- inside it, `x = yield subgen` runs `subgen` to completion and sends its return value back as `x`;
- `raise TailCall(subgen)` ends the current generator and runs `subgen` in its place (its return value goes to
  whoever was waiting for the current one).
"""


class TailCall(Exception):
    def __init__(self, call):
        super().__init__()
        self.call = call


def trampoline(gen):
    stack = [gen]
    value = None
    while stack:
        try:
            sub = stack[-1].send(value)
        except StopIteration as stop:
            stack.pop()
            value = stop.value
        except TailCall as tail:
            stack[-1] = tail.call
            value = None
        else:
            stack.append(sub)
            value = None
    return value
