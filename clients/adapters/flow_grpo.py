"""Reward functions that drop into Flow-GRPO and the FIRM release's DiffusionNFT trainers.

Those trainers call `reward_fn(images, prompts, metadata, ref_images, only_strict=...)` (the
editing trainer passes the source images as `ref_images`; the text-to-image ones leave it out),
from a pool of 8 threads at once, and turn every value of the returned dict into a tensor with
`torch.as_tensor(v).float()`. So a `FirmRewardFn` returns
`({"avg": ..., "<reward>": ..., "<dimension>": ..., "failed": ...}, {"errors": [...]})`, every
value of the first a float64 array with one entry per image:

- `avg`: the weighted sum the trainer turns into advantages;
- `firm_edit` / `firm_gen`: the CME / QMA reward; `execution`, `consistency`,
  `instruction_following`, `quality`: the normalised dimensions;
- `failed`: 1.0 where the server could not score the item, else 0.0.

The second holds the call's own failures, `(index in the call, reason)`, which also go to the
`clients.adapters` logger; the reward function keeps nothing of a call, so concurrent calls never
see each other's. These trainers have no mask, so a failed item gets the value `on_failure` gives
(see `clients.adapters.failures`); the default, `group_mean`, leaves its advantage at about 0 when
its group is scored in one call. On several ranks a group is spread over several calls: use
`on_failure="nan"` with this module's `PerPromptStatTracker` (or `BanningPerPromptStatTracker` for
the editing trainers), which leave NaN rewards out of every group's statistics.

    >>> from clients.adapters.flow_grpo import multi_score
    >>> multi_score("cuda", {"firm_edit": 1.0}, client=object()).task
    'edit'
    >>> multi_score("cuda", {"execution": 0.5, "quality": 0.5}, client=object())
    Traceback (most recent call last):
    ...
    ValueError: score_dict mixes the terms of several tasks (edit, gen): ['execution', 'quality']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.adapters.failures import Failures, OnFailure, check_on_failure, fill_failures, unscored
from clients.adapters.inputs import INPUTS, Batch, TaskInputs, task_inputs
from clients.adapters.stat_tracking import BanningPerPromptStatTracker, PerPromptStatTracker
from clients.client import RewardClient
from clients.protocol import ScoringResponse, Task
from clients.tasks import EDIT, GEN

logger = logging.getLogger("clients.adapters")

__all__ = [
    "BanningPerPromptStatTracker",
    "FirmRewardFn",
    "PerPromptStatTracker",
    "edit_reward_fn",
    "gen_reward_fn",
    "multi_score",
    "reward_columns",
]


def _per_item(metadata: Any, n: int) -> list[Mapping[str, Any]]:
    """The trainers pass one dict per image, one dict for the batch, or nothing."""
    if metadata is None:
        return [{}] * n
    if isinstance(metadata, Mapping):
        return [metadata] * n
    items = list(metadata)
    if len(items) != n:
        raise ValueError(f"metadata: expected one entry per image ({n}), got {len(items)}")
    return [m or {} for m in items]


def reward_columns(reply: ScoringResponse, inputs: TaskInputs) -> dict[str, np.ndarray]:
    """The reward and each normalised dimension, NaN where missing."""
    reward, *dimensions = inputs.terms
    columns: dict[str, list[float]] = {name: [] for name in inputs.terms}
    for result in reply.results:
        columns[reward].append(np.nan if result.reward is None else result.reward)
        for name in dimensions:
            dimension = getattr(result, name)
            columns[name].append(np.nan if dimension is None or dimension.normalized is None else dimension.normalized)
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


class FirmRewardFn:
    """`(images, prompts, metadata, ref_images=None, **host_options) -> (rewards, {"errors": failures})`.

    task: a name of `clients.tasks.TASKS`: "edit" (CME) or "gen" (QMA). A task that compares
    against a source image takes it from `ref_images`, else from `metadata[i][source_key]` (a path
    relative to `source_root` when that is given); one that takes a requirement sends
    `metadata[i][requirement_key]` when present. weights: how `avg` sums the terms, by default
    the combined reward alone. Extra keyword arguments of the trainer (`only_strict`, ...) are
    accepted and ignored. timeout_s: each call's own deadline on the server (items past it fail and are
    handled as `on_failure` says); the client waits a little longer. Safe to call from several threads
    at once.
    """

    def __init__(
        self,
        client: RewardClient,
        task: Task,
        *,
        weights: Mapping[str, float] | None = None,
        on_failure: OnFailure = "group_mean",
        source_key: str = "source",
        source_root: str | Path | None = None,
        requirement_key: str = "requirement",
        timeout_s: float | None = None,
    ) -> None:
        self.inputs = task_inputs(task)
        self.timeout_s = timeout_s
        terms = self.inputs.terms
        self.weights = dict(weights or {terms[0]: 1.0})
        unknown = sorted(set(self.weights) - set(terms))
        if unknown:
            raise ValueError(f"unknown {task} terms {unknown}; known: {list(terms)}")
        self.client, self.task, self.on_failure = client, task, check_on_failure(on_failure)
        self.source_key, self.requirement_key = source_key, requirement_key
        self.source_root = None if source_root is None else Path(source_root)

    def __call__(
        self, images: Any, prompts: Sequence[str], metadata: Any = None, ref_images: Any = None, **host_options: Any
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        texts = [str(p) for p in prompts]
        per_item = _per_item(metadata, len(texts))
        sources: list[Any] | None = None
        requirements: list[Any] | None = None
        if self.inputs.source is not None:
            sources = list(ref_images) if ref_images is not None else [self._source(m) for m in per_item]
        if self.inputs.requirement is not None:
            requirements = [m.get(self.requirement_key) for m in per_item]
        reply = self.inputs.score(
            self.client, Batch(images, texts, sources, requirements, options={"timeout_s": self.timeout_s})
        )
        rewards, errors = self._rewards(reply, texts)
        return rewards, {"errors": errors}

    def _source(self, item: Mapping[str, Any]) -> Any:
        if self.source_key not in item:
            raise KeyError(
                f"no source image: pass ref_images, or put the source under metadata[{self.source_key!r}] "
                "(set source_key to name another key)"
            )
        source = item[self.source_key]
        if self.source_root is not None and isinstance(source, str | Path) and not str(source).startswith("data:"):
            return self.source_root / source
        return source

    def _rewards(self, reply: ScoringResponse, groups: list[str]) -> tuple[dict[str, np.ndarray], Failures]:
        """The columns the trainer reads, and this call's failures."""
        values = reward_columns(reply, self.inputs)
        avg = sum(weight * values[name] for name, weight in self.weights.items())
        failed = np.isnan(np.asarray(avg, dtype=np.float64))
        errors, reason = unscored(reply.results, failed)
        if errors:
            logger.warning(
                "%d of %d items were not scored (%s); on_failure=%r",
                len(errors),
                len(groups),
                reason,
                self.on_failure,
            )
        out = {"avg": fill_failures(avg, groups, self.on_failure, reason)}
        out.update({name: fill_failures(v, groups, self.on_failure, reason) for name, v in values.items()})
        out["failed"] = failed.astype(np.float64)
        return out, errors


def gen_reward_fn(client: RewardClient, **options: Any) -> FirmRewardFn:
    """QMA rewards for text-to-image samples; options as for `FirmRewardFn`."""
    return FirmRewardFn(client, GEN.name, **options)


def edit_reward_fn(client: RewardClient, **options: Any) -> FirmRewardFn:
    """CME rewards for edited images; options as for `FirmRewardFn`."""
    return FirmRewardFn(client, EDIT.name, **options)


def multi_score(
    device: Any = None,
    score_dict: Mapping[str, float] | None = None,
    *,
    client: RewardClient | None = None,
    on_failure: OnFailure = "group_mean",
    source_key: str = "source",
    source_root: str | Path | None = None,
    image_format: str | None = None,
    jpeg_quality: int | None = None,
    timeout_s: float | None = None,
    **host_options: Any,
) -> FirmRewardFn:
    """Shaped like the trainers' `flow_grpo.rewards.multi_score(device, score_dict)` factory.

    `score_dict` maps terms (`firm_edit`, `execution`, `consistency`, or `firm_gen`,
    `instruction_following`, `quality`) to their weights in `avg`. The client defaults to
    `RewardClient(image_format=..., jpeg_quality=...)`, configured from FIRM_URL / FIRM_API_KEY and
    the other FIRM_* variables (the encoding: FIRM_IMAGE_FORMAT, FIRM_JPEG_QUALITY; by default the
    release's JPEG at 75); a client of your own brings its own encoding. `device` and the release's own
    options (score normalisation, total-score settings) are accepted and have no effect: the
    server computes CME and QMA. `timeout_s` is each call's own deadline on the server.
    """
    weights = dict(score_dict or {EDIT.reward_term: 1.0})
    tasks = sorted({task for task, entry in INPUTS.items() for name in weights if name in entry.terms})
    if len(tasks) > 1:
        raise ValueError(f"score_dict mixes the terms of several tasks ({', '.join(tasks)}): {sorted(weights)}")
    if not tasks:
        known = [term for entry in INPUTS.values() for term in entry.terms]
        raise ValueError(f"score_dict names no FIRM term: {sorted(weights)}; known: {known}")
    if client is not None and (image_format, jpeg_quality) != (None, None):
        raise ValueError("a client of your own encodes with its own settings: give it image_format / jpeg_quality")
    if host_options:
        logger.info("ignoring the trainer's reward options %s: the server computes the rewards", sorted(host_options))
    return FirmRewardFn(
        client if client is not None else RewardClient(image_format=image_format, jpeg_quality=jpeg_quality),
        tasks[0],
        weights=weights,
        on_failure=on_failure,
        source_key=source_key,
        source_root=source_root,
        timeout_s=timeout_s,
    )
