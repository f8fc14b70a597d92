"""A second set of LoRA weights that trails the trained ones: NFT's sampling (old) adapter, and the EMA.

Both are copies of the trained adapter's weights, blended toward it now and then, and swapped into
the transformer for a while (sampling with the old adapter, evaluating or saving the EMA). Swapping
the values of the same parameters, rather than adding a second adapter to the model, keeps one set
of LoRA layers, so the forward pass, the reference pass (adapters off) and the checkpoints see the
model exactly as GRPO does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class ShadowWeights:
    """A copy of `params`' values (same devices and dtypes), blended toward them on request."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.weights = [p.detach().clone() for p in params]

    @torch.no_grad()
    def blend(self, params: Sequence[torch.nn.Parameter], keep: float) -> None:
        """shadow = keep * shadow + (1 - keep) * params; keep 0 copies the trained weights.

        >>> p = [torch.nn.Parameter(torch.zeros(2))]; shadow = ShadowWeights(p)
        >>> _ = p[0].data.fill_(1.0); shadow.blend(p, 0.75); shadow.weights[0].tolist()
        [0.25, 0.25]
        """
        for shadow, p in zip(self.weights, params, strict=True):
            shadow.mul_(keep).add_(p.detach(), alpha=1.0 - keep)

    @contextmanager
    def applied(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """The model runs with the shadow weights inside the block; the trained values come back after.

        The two sets trade storage (no copy, no extra memory), so nothing may backpropagate through a
        forward pass made inside the block after it ends.
        """
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: Sequence[torch.nn.Parameter]) -> None:
        if len(params) != len(self.weights):
            raise ValueError(f"{len(params)} parameters for {len(self.weights)} shadow weights")
        for i, p in enumerate(params):
            p.data, self.weights[i] = self.weights[i], p.data

    @torch.no_grad()
    def distance(self, params: Sequence[torch.nn.Parameter]) -> float:
        """The L2 norm of (shadow - params) over every weight: how far the shadow trails."""
        total = sum(float(((s - p.detach()) ** 2).sum()) for s, p in zip(self.weights, params, strict=True))
        return math.sqrt(total)


def ema_keep(step: int, decay: float) -> float:
    """The EMA's decay after optimizer step `step`: warmed up as min((1 + step) / (10 + step), decay), the
    release's rule, so the first steps' weights are not drowned by the initial adapter.

    >>> ema_keep(1, 0.9), ema_keep(8, 0.9), ema_keep(1000, 0.9)
    (0.18181818181818182, 0.5, 0.9)
    """
    return min((1 + step) / (10 + step), decay)
