"""Nested states (state_dicts, optimizer and scheduler states) as JSON plus named tensors.

No pickle anywhere: tensors go to safetensors, structure to JSON, so what a checkpoint or a
fit client sends can be read without running code.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes


def encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON form of a nested state (state_dicts, lists, numbers); its tensors go to `tensors`."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would both be stored as {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{key}: only str and int keys can be stored")
        items = [[k, encode(v, f"{key}/{k}" if key else str(k), tensors)] for k, v in obj.items()]
        # optimizer state is keyed by int, and JSON object keys are strings: keep the pairs
        return dict(items) if all(isinstance(k, str) for k in obj) else {"__items__": items}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")


def decode(obj, tensors: Mapping[str, torch.Tensor]):
    """The nested state `encode` described, with its tensors put back."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def state_to_bytes(state: Mapping, meta: Mapping | None = None) -> bytes:
    """An owner's whole state (no buffered packets) as safetensors; `meta` rides in its JSON header.
    No pickle: what travels between a server and a fit client is tensors and JSON only."""
    if state.get("pending") or state.get("pending_steps"):
        raise ValueError("a state with buffered packets does not travel this way (use packets_to_bytes)")
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode({k: v for k, v in state.items() if k != "pending"}, "", tensors)
    return save_bytes(tensors, metadata={"state": json.dumps(encoded), "meta": json.dumps(dict(meta or {}))})


def state_from_bytes(data: bytes) -> tuple[dict, dict]:
    """(state, meta) of `state_to_bytes`; raises ValueError on anything else."""
    try:
        tensors = load_bytes(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        state = decode(json.loads(header["state"]), tensors)
        meta = json.loads(header["meta"])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; so does a truncated header
        raise ValueError(f"not an owner state: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"adapters", "optimizer", "scheduler", "version"} <= state.keys() \
            or state.get("pending_steps", 0) != 0:
        raise ValueError("not an owner state without buffered packets")
    state["pending"], state["pending_steps"] = [], 0
    return state, meta
