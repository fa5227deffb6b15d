"""Parameters and optimizer state on an accelerator, seen from the host as a dict of arrays.

A `DeviceArrays` holds one host NumPy array and one device array per name and remembers which
copy is newest. The step reads `device(name)` (uploading only a host copy that changed); after
a step writes them, `written()` marks the device copies newest. Reading an item from the host
(checkpoints, numerics checks, early stopping's best copy) downloads it, once, and marks the
host copy newest, since the caller may write into it (`params[k][...] = v`). So parameters and
optimizer state stay on the device across steps, move only when the host asks for them, and a
checkpoint saved from either target is the same host arrays.
"""
from __future__ import annotations

from collections.abc import MutableMapping

HOST, DEVICE, SAME = "host", "device", "same"


class DeviceArrays(MutableMapping):
    def __init__(self, host: dict, target):
        self.t = target
        self.host = dict(host)
        self.dev: dict = {}
        self.newest = {k: HOST for k in self.host}

    # ---- the host's view ----------------------------------------------------------------------
    def __getitem__(self, k):
        if self.newest[k] == DEVICE:
            self.dev[k].copy_to_host(self.host[k])
        self.newest[k] = HOST
        return self.host[k]

    def __setitem__(self, k, v) -> None:
        self.host[k] = v
        self.newest[k] = HOST

    def __delitem__(self, k) -> None:
        del self.host[k], self.newest[k]
        self.dev.pop(k, None)

    def __iter__(self):
        return iter(self.host)

    def __len__(self) -> int:
        return len(self.host)

    # ---- the step's view ----------------------------------------------------------------------
    def device(self, k):
        """The device array of `k`, up to date."""
        if self.newest[k] == HOST:
            if k in self.dev and self.dev[k].shape == self.host[k].shape:
                self.dev[k].copy_to_device(self.host[k])
            else:
                self.dev[k] = self.t.to_device(self.host[k])
            self.newest[k] = SAME
        return self.dev[k]

    def written(self) -> None:
        """A step has run: the device copies it was given are now the newest."""
        for k, where in self.newest.items():
            if where == SAME:
                self.newest[k] = DEVICE


def require_gpu() -> None:
    """Raise the user's error when --target cuda finds no GPU (nor numba's simulator)."""
    from dsl.diagnostics import DlcError
    try:
        from numba import cuda
        ok = cuda.is_available()
    except Exception:                 # numba-cuda not installed
        ok = False
    if not ok:
        raise DlcError("--target cuda: no CUDA GPU here (numba.cuda.is_available() is false)", None,
                       ["run on the CPU with --target cpu; install the GPU support with pip install '.[cuda]'; "
                        "NUMBA_ENABLE_CUDASIM=1 runs numba's (slow) simulator"])


def on_target(arrays: dict, target):
    """`arrays` as the step of `target` wants them: as they are on the CPU, else DeviceArrays."""
    return arrays if target.name == "cpu" else DeviceArrays(arrays, target)
