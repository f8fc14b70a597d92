"""A TRL `GRPOTrainer` reward function backed by the FIRM server.

TRL calls each entry of `reward_funcs` as `f(prompts=..., completions=..., completion_ids=...,
**columns)`, one call per batch, and reads one reward (or `None`) per completion. The policy
writes text, so the images to judge come from one of two places:

- `render(prompts, completions)`, a function of yours that turns each completion into an image
  (a diffusion prompt you run, SVG you rasterise, ...);
- a column TRL does not reserve, `generated_images` by default: a dataset column, or an extra
  field returned by a `rollout_func`. (`image` and `images` are the policy's *input* images in
  TRL, so they are never read here.)

Completions are never read as images or file paths, and neither is any text in the images: an
image is a PIL image, an array, a tensor or encoded bytes. A one-element list stands for its
element. For editing, the source images come from the `source` column.

With the default `on_failure="nan"` a failed item's reward is `None`. TRL 1.16 leaves a
completion for which every reward function returned `None` out of its group's baseline and
gives it advantage 0; with other reward functions beside this one, `on_failure="group_mean"`
keeps the failed item's total in line with its group instead.

    >>> from clients.adapters.trl import firm_reward
    >>> reward = firm_reward(object(), "gen")
    >>> reward.__name__
    'firm_gen'
    >>> reward(prompts=["a red square"], completions=["/etc/passwd"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: firm_gen has no images to score: pass render=... to firm_reward, or give the generated images ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clients.adapters.failures import OnFailure, check_on_failure, fill_failures
from clients.adapters.inputs import Batch, one_image_each, prompt_text, task_inputs
from clients.client import RewardClient
from clients.protocol import Task

logger = logging.getLogger("clients.adapters")

TrlRewardFunc = Callable[..., list[float | None]]
Render = Callable[[list[Any], list[Any]], Sequence[Any]]


def firm_reward(
    client: RewardClient,
    task: Task,
    *,
    render: Render | None = None,
    images_column: str = "generated_images",
    source_column: str = "source",
    prompt_column: str | None = None,
    requirement_column: str = "requirement",
    on_failure: OnFailure = "nan",
    timeout_s: float | None = None,
) -> TrlRewardFunc:
    """A `reward_funcs` entry scoring each completion's image with FIRM-Gen (QMA) or FIRM-Edit (CME).

    prompt_column: a column holding the text the critic should judge against (by default the
    last user text of each prompt). source_column: the source images, for a task that compares
    against one (editing). requirement_column: optional requirements, for a task that takes them
    (FIRM-Gen). timeout_s: each call's own deadline on the server; items past it fail (see on_failure).
    """
    inputs = task_inputs(task)
    if images_column in ("image", "images"):
        raise ValueError(f"{images_column!r} holds the policy's input images in TRL; use another column")
    on_failure = check_on_failure(on_failure)
    name = inputs.spec.reward_term

    def images_for(prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> list[Any]:
        if render is not None:
            return one_image_each(list(render(prompts, completions)), len(completions), "render()", allow_paths=False)
        if columns.get(images_column) is not None:
            return one_image_each(columns[images_column], len(completions), images_column, allow_paths=False)
        raise ValueError(
            f"{name} has no images to score: pass render=... to firm_reward, or give the generated images in the "
            f"{images_column!r} column (a dataset column or an extra field of your rollout_func)"
        )

    def firm(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        images = images_for(list(prompts), list(completions), columns)
        texts = [str(t) for t in columns[prompt_column]] if prompt_column else [prompt_text(p) for p in prompts]
        sources: list[Any] | None = None
        if inputs.source is not None:
            if columns.get(source_column) is None:
                raise ValueError(f"{name} needs the source images in the {source_column!r} column")
            sources = one_image_each(columns[source_column], len(images), source_column, allow_paths=True)
        requirements = columns.get(requirement_column) if inputs.requirement is not None else None
        reply = inputs.score(client, Batch(images, texts, sources, requirements, options={"timeout_s": timeout_s}))
        rewards = np.asarray(reply.rewards(), dtype=np.float64)
        failures = reply.errors()
        if failures:
            logger.warning("%d of %d items were not scored (%s)", len(failures), len(rewards), failures[0][1])
        if callable(columns.get("log_metric")):
            columns["log_metric"](f"{name}/failed_fraction", len(failures) / max(len(rewards), 1))
        if on_failure == "nan":
            return [None if np.isnan(r) else float(r) for r in rewards]
        reason = failures[0][1] if failures else ""
        return [float(r) for r in fill_failures(rewards, texts, on_failure, reason)]

    firm.__name__ = name  # TRL logs each reward function under its name
    return firm
