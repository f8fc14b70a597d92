"""Reward functions with the Flow-GRPO / DiffusionNFT signature: (images, prompts, metadata) -> (rewards, info).

`images` may be an NCHW float tensor in [0, 1], an NHWC uint8 array or a list of PIL images.
Failed items get a NaN reward; `info["mask"]` is False for them, so the trainer can leave them
out of the advantage statistics and the loss.

    >>> from clients import RewardClient                                       # doctest: +SKIP
    >>> reward_fn = gen_reward_fn(RewardClient("http://critic:8000"))           # doctest: +SKIP
    >>> rewards, info = reward_fn(images, prompts, [{}] * len(prompts))        # doctest: +SKIP
    >>> edit_fn = edit_reward_fn(RewardClient("http://critic:8000"))           # doctest: +SKIP
    >>> rewards, info = edit_fn(edited, instructions, [{"source": img} for img in sources])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clients.client import RewardClient
from clients.protocol import EditScoreResponse, GenScoreResponse

RewardFn = Callable[[Any, Sequence[str], Sequence[dict[str, Any]]], tuple[np.ndarray, dict[str, Any]]]


def _dimension(reply: EditScoreResponse | GenScoreResponse, name: str) -> np.ndarray:
    values = []
    for result in reply.results:
        dim = getattr(result, name)
        values.append(np.nan if dim is None or dim.normalized is None else dim.normalized)
    return np.asarray(values, dtype=np.float64)


def _info(reply: EditScoreResponse | GenScoreResponse, dimensions: tuple[str, str]) -> dict[str, Any]:
    info: dict[str, Any] = {name: _dimension(reply, name) for name in dimensions}
    info["mask"] = np.asarray(reply.mask(), dtype=bool)
    info["errors"] = [None if r.error is None else str(r.error) for r in reply.results]
    return info


def gen_reward_fn(client: RewardClient) -> RewardFn:
    """QMA rewards for text-to-image samples; `metadata[i]["requirement"]` is used when present."""

    def reward(images: Any, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> tuple[np.ndarray, dict]:
        requirements = [m.get("requirement") if m else None for m in metadata] if metadata else None
        reply = client.score_generations(images, list(prompts), requirements=requirements)
        return np.asarray(reply.rewards(), dtype=np.float64), _info(reply, ("instruction_following", "quality"))

    return reward


def edit_reward_fn(client: RewardClient, source_key: str = "source") -> RewardFn:
    """CME rewards for edited images; `prompts` are the instructions, `metadata[i][source_key]` the source image."""

    def reward(images: Any, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> tuple[np.ndarray, dict]:
        sources = [m[source_key] for m in metadata]
        reply = client.score_edits(sources, images, list(prompts))
        return np.asarray(reply.rewards(), dtype=np.float64), _info(reply, ("execution", "consistency"))

    return reward
