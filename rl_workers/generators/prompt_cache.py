"""Prompt embeddings computed once per prompt, with the text encoders on the GPU only while they embed.

The text encoders are large (SD3's T5-XXL: 4.7B parameters; Qwen-Image-Edit's Qwen2.5-VL: 7B) and
run once per prompt, while the transformer runs hundreds of times per group. So the encoders wait on
the CPU, move to the GPU for an uncached prompt, and go back; the embeddings are kept on the CPU in a
bounded least-recently-used cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

Embeddings = dict[str, torch.Tensor | None]


class PromptCache:
    def __init__(self, encoders: list[torch.nn.Module], device: torch.device, *, size: int, offload: bool) -> None:
        self.encoders = encoders
        self.device = device
        self.size = size
        self.offload = offload and device.type != "cpu"
        self.embedded = 0  # prompts the encoders ran for (cache misses)
        self._entries: OrderedDict[Hashable, Embeddings] = OrderedDict()
        if self.offload:
            self._move("cpu")

    def _move(self, device: torch.device | str) -> None:
        for encoder in self.encoders:
            encoder.to(device)

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the device for the block, back on the CPU after it (when offloading)."""
        if not self.offload:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def get(self, key: Hashable, embed: Callable[[], Embeddings]) -> Embeddings:
        """The embeddings of `key` on the device: from the cache, or computed by `embed` (one row each)."""
        cached = self._entries.get(key)
        if cached is None:
            with torch.no_grad(), self.encoders_on_device():
                cached = embed()
            self.embedded += 1
            if self.size == 0:
                return cached
            cached = {k: None if v is None else v.to("cpu") for k, v in cached.items()}
            self._entries[key] = cached
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return {k: None if v is None else v.to(self.device) for k, v in cached.items()}


def repeat_rows(embeddings: Embeddings, n: int) -> Embeddings:
    """One prompt's embeddings (batch 1) as `n` rows, one per sample of its group (views, no copies)."""
    return {k: None if v is None else v.expand(n, *v.shape[1:]) for k, v in embeddings.items()}
