"""A verl custom reward function (`custom_reward_function.path` / `.name` in the verl config).

verl's reward managers call it with keyword arguments, in one of two forms:

- per item (the `naive` manager and the reward loop):
  `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`, one dict back;
- per batch (`reward_model.reward_manager=batch`):
  `compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=...)`, a list back.

`custom_reward_function.reward_kwargs` arrive as further keyword arguments and are ignored.
The images and texts come from each item's `extra_info`: for generation `{"image", "prompt",
"requirement"?}`, for editing `{"source", "edited", "instruction"}`; or the judged image comes
from `render(solution_strs, extra_infos)`. The response text itself is never read as an image or
a path.

Each result is `{"score", "failed", <reward>, <dimensions>}`, all floats and the same keys for
every item (verl collects each key into a column); why an item failed goes to the
`clients.adapters` logger. verl's GRPO advantages have no mask, so a failed item's values follow
`on_failure` (see `clients.adapters.failures`). The default, `group_mean`, needs the whole batch
and so the batch manager; per-item calls need `on_failure` set to a number or `"nan"`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clients.adapters.failures import OnFailure, check_on_failure, fill_failures, unscored
from clients.adapters.flow_grpo import reward_columns
from clients.adapters.inputs import Batch, one_image_each, task_inputs
from clients.client import RewardClient
from clients.protocol import Task

logger = logging.getLogger("clients.adapters")

Render = Callable[[list[str], list[dict[str, Any]]], Sequence[Any]]


class VerlComputeScore:
    """verl's `compute_score`, in both its per-item and its batch calling forms."""

    def __init__(
        self,
        client: RewardClient,
        task: Task,
        *,
        render: Render | None = None,
        on_failure: OnFailure = "group_mean",
        timeout_s: float | None = None,
    ) -> None:
        self.inputs = task_inputs(task)
        self.timeout_s = timeout_s  # each call's own deadline on the server
        self.client, self.task, self.render = client, task, render
        self.on_failure = check_on_failure(on_failure)

    def __call__(
        self,
        data_source: Any = None,
        solution_str: str | None = None,
        ground_truth: Any = None,
        extra_info: dict[str, Any] | None = None,
        *,
        data_sources: Sequence[Any] | None = None,
        solution_strs: Sequence[str] | None = None,
        ground_truths: Sequence[Any] | None = None,
        extra_infos: Sequence[dict[str, Any]] | None = None,
        **reward_kwargs: Any,
    ) -> dict[str, float] | list[dict[str, float]]:
        if extra_infos is not None:
            return self.score(list(solution_strs or [""] * len(extra_infos)), list(extra_infos))
        if extra_info is None:
            raise ValueError("extra_info must carry the images and texts to score")
        if self.on_failure == "group_mean":
            raise ValueError(
                "on_failure='group_mean' needs the whole batch: set reward_model.reward_manager=batch, "
                "or pass on_failure=<number> or 'nan' for per-item calls"
            )
        return self.score([solution_str or ""], [extra_info])[0]

    def score(self, responses: list[str], infos: list[dict[str, Any]]) -> list[dict[str, float]]:
        """One result per item of a batch; each item's `extra_info` keys are its task's wire item fields."""
        inputs = self.inputs
        if self.render is not None:
            images = one_image_each(list(self.render(responses, infos)), len(infos), "render()", allow_paths=False)
        else:
            images = self._images(infos, inputs.image)
        texts = [str(i[inputs.text]) for i in infos]
        sources = None if inputs.source is None else self._images(infos, inputs.source)
        requirements = None if inputs.requirement is None else [i.get(inputs.requirement) for i in infos]
        reply = inputs.score(
            self.client, Batch(images, texts, sources, requirements, options={"timeout_s": self.timeout_s})
        )
        values = reward_columns(reply, inputs)
        reward = inputs.spec.reward_term
        failed = np.isnan(values[reward])
        errors, reason = unscored(reply.results, failed)
        if errors:  # to the log only: the results are floats, and the function keeps nothing of a call
            logger.warning("%d of %d items were not scored (%s)", len(errors), len(infos), reason)
        filled = {name: fill_failures(v, texts, self.on_failure, reason) for name, v in values.items()}
        filled["score"] = filled[reward]
        filled["failed"] = failed.astype(np.float64)
        return [{name: float(column[i]) for name, column in filled.items()} for i in range(len(infos))]

    @staticmethod
    def _images(infos: list[dict[str, Any]], key: str) -> list[Any]:
        """One image per item from `extra_info[key]` (a path is read: the host's own data)."""
        return one_image_each([i.get(key) for i in infos], len(infos), f"extra_info[{key!r}]", allow_paths=True)


def make_compute_score(
    client: RewardClient,
    task: Task,
    *,
    render: Render | None = None,
    on_failure: OnFailure = "group_mean",
    timeout_s: float | None = None,
) -> VerlComputeScore:
    """The function to name in `custom_reward_function.name`; see the module docstring."""
    return VerlComputeScore(client, task, render=render, on_failure=on_failure, timeout_s=timeout_s)
