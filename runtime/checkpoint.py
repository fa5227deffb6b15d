"""Checkpoints: parameters, optimizer state and the step count in safetensors or `.npz`.

Never pickle: `.npz` files are read with `allow_pickle=False`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsl.diagnostics import DlcError


def save(path: str | Path, params: dict, state: dict, meta: dict) -> None:
    p = Path(path)
    tensors = {f"param/{k}": np.ascontiguousarray(v) for k, v in params.items()}
    tensors.update({f"state/{k}": np.ascontiguousarray(v) for k, v in state.items()})
    if p.suffix == ".npz":
        tensors["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, **tensors)
        tmp.replace(p)
    else:
        from safetensors.numpy import save_file
        tmp = p.with_name(p.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"dlc": json.dumps(meta)})
        tmp.replace(p)


def load(path: str | Path) -> tuple[dict, dict, dict]:
    p = Path(path)
    if not p.exists():
        raise DlcError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                tensors = {k: f[k] for k in f.files}
            meta = json.loads(bytes(tensors.pop("__meta__", np.zeros(0, np.uint8))).decode() or "{}")
        else:
            from safetensors import safe_open
            tensors = {}
            with safe_open(str(p), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("dlc", "{}"))
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
    except DlcError:
        raise
    except Exception as e:
        raise DlcError(f"cannot read checkpoint {p}: {e}") from None
    params = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    return params, state, meta
