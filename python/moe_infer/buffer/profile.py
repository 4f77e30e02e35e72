"""Activation profiles: each layer's observed expert counts, saved and used to warm-start buffers."""

import json
from typing import Mapping

import torch

from .runtime import ExpertBuffer

_PROFILE_FORMAT = "moe_infer.activation_profile"


def save_activation_profile(path: str, buffers: Mapping[str, ExpertBuffer]) -> None:
    """Writes each layer's observed activation counts (tokens and batches per expert) as JSON."""
    layers = {}
    for name, buffer in buffers.items():
        counts = buffer.activation_counts()
        layers[name] = {
            "num_experts": buffer.num_experts,
            "tokens": counts["tokens"].tolist(),
            "batches": counts["batches"].tolist(),
        }
    with open(path, "w") as f:
        json.dump({"format": _PROFILE_FORMAT, "version": 1, "layers": layers}, f)


def load_activation_profile(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Reads a profile written by :func:`save_activation_profile`: {layer: {"tokens", "batches"}}."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"load_activation_profile: '{path}' is not a readable profile ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != _PROFILE_FORMAT:
        raise ValueError(f"load_activation_profile: '{path}' is not a moe_infer activation profile")
    profile = {}
    try:
        for name, layer in payload["layers"].items():
            tokens, batches = torch.tensor(layer["tokens"]), torch.tensor(layer["batches"])
            if tokens.numel() != layer["num_experts"] or batches.numel() != layer["num_experts"]:
                raise ValueError(f"load_activation_profile: layer '{name}' has inconsistent counts")
            profile[name] = {"tokens": tokens, "batches": batches}
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"load_activation_profile: '{path}' is not a complete profile (missing or bad {error})"
        ) from None
    return profile


def warm_start_buffers(
    buffers: Mapping[str, ExpertBuffer], profile: Mapping[str, Mapping[str, torch.Tensor]]
) -> list[str]:
    """Pre-fills each buffer named in ``profile`` with its most used experts; returns their names."""
    warmed = []
    for name, buffer in buffers.items():
        if name in profile:
            buffer.warm_start(profile[name]["tokens"], profile[name]["batches"])
            warmed.append(name)
    return warmed
