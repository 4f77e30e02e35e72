"""Prefetch with a next-layer router predictor."""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .runtime import ExpertBuffer


def _default_router(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [T, H] -> expert ids [T, k] with the layer's own router."""
    if hasattr(layer, "route"):  # moe_infer.MoELayer
        return lambda hidden: layer.route(hidden)[2]
    router = getattr(layer, "gate", None)
    if router is None:
        router = getattr(layer, "router", None)
    if router is None:
        raise TypeError(f"NextLayerPrefetcher: {type(layer).__name__} has no gate/router; pass routers=")

    def route(hidden):
        out = router(hidden)
        if not isinstance(out, tuple):
            raise TypeError(f"NextLayerPrefetcher: {type(router).__name__} returns logits only; pass routers=")
        return out[-1]  # transformers v5 routers return (logits, weights, indices)

    return route


class NextLayerPrefetcher:
    """Guesses each MoE layer's experts from the previous MoE layer's input, and prefetches them.

    A forward pre-hook on layer l runs layer l+1's router on layer l's input hidden states (the
    residual stream changes little across one layer), and asks layer l+1's buffer to prefetch the
    predicted experts, most tokens first, while layer l computes. Each buffer scores the
    prediction against the experts it then really needs: ``stats()["precision"]`` and
    ``["recall"]``; :meth:`accuracy` collects them.

    Args:
        layers: the MoE layers in execution order (moe_infer MoELayer or transformers sparse blocks).
        buffers: their buffers (default: ``layer.expert_buffer`` or ``layer.experts.expert_buffer``).
        routers: per layer, hidden [T, H] -> ids [T, k] (default: the layer's own router).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        buffers: Optional[Sequence[ExpertBuffer]] = None,
        routers: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
    ):
        self.layers = list(layers)
        if buffers is None:
            buffers = [
                getattr(layer, "expert_buffer", None) or getattr(getattr(layer, "experts", None), "expert_buffer", None)
                for layer in self.layers
            ]
        self.buffers = list(buffers)
        if len(self.buffers) != len(self.layers):
            raise ValueError(f"NextLayerPrefetcher: {len(self.layers)} layers but {len(self.buffers)} buffers")
        unbuffered = [i for i, b in enumerate(self.buffers[1:], 1) if b is None]
        if unbuffered:
            raise ValueError(
                f"NextLayerPrefetcher: layers {unbuffered} have no expert buffer to prefetch into; buffer them "
                "first (MoELayer(expert_buffer=N) or moe_infer.integrations.hf.optimize(model, expert_buffer=N)) "
                "or pass buffers="
            )
        self.routers = list(routers) if routers is not None else [_default_router(layer) for layer in self.layers]
        self._handles = [
            self.layers[i].register_forward_pre_hook(self._hook(i + 1)) for i in range(len(self.layers) - 1)
        ]

    def _hook(self, target: int):
        def hook(module, args):
            hidden = args[0]
            with torch.no_grad():
                ids = self.routers[target](hidden.reshape(-1, hidden.shape[-1]))
                counts = torch.bincount(ids.reshape(-1).long() + 1, minlength=self.buffers[target].num_experts + 1)[1:]
            counts = counts.cpu()
            ranked = [e for e in torch.argsort(counts, descending=True, stable=True).tolist() if counts[e] > 0]
            self.buffers[target].prefetch(ranked, is_prediction=True)

        return hook

    def accuracy(self) -> list[dict[str, float]]:
        """Per predicted layer (1..L-1): precision and recall of the predicted expert sets."""
        return [{k: b.stats()[k] for k in ("precision", "recall", "predictions")} for b in self.buffers[1:]]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
