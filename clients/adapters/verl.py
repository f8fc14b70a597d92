"""A verl custom reward function (`custom_reward_function.path` / `.name` in the verl config).

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)`, one sample at
a time, or with lists when the batch reward manager is used; both work here. The images and
texts come from `extra_info`: for generation `{"image", "prompt", "requirement"?}`, for editing
`{"source", "edited", "instruction"}`. The return value is a dict whose "score" verl takes as
the reward; a failed item has score NaN and `"valid": 0.0`, so it can be filtered before the
advantages are computed.

    # reward.py, named in the verl config                                    (doctest: +SKIP)
    from clients import RewardClient
    from clients.adapters.verl import make_compute_score
    compute_score = make_compute_score(RewardClient("http://critic:8000"), "gen")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from clients.client import RewardClient


def _scores(client: RewardClient, task: str, infos: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if task == "gen":
        reply = client.score_generations(
            [i["image"] for i in infos],
            [i["prompt"] for i in infos],
            requirements=[i.get("requirement") for i in infos],
        )
    else:
        reply = client.score_edits(
            [i["source"] for i in infos], [i["edited"] for i in infos], [i["instruction"] for i in infos]
        )
    out = []
    for result in reply.results:
        if result.reward is None:
            reason = str(result.error) if result.error else "no reward"
            out.append({"score": math.nan, "valid": 0.0, "error": reason})
        else:
            out.append({"score": result.reward, "valid": 1.0})
    return out


def make_compute_score(client: RewardClient, task: Literal["gen", "edit"]) -> Callable[..., Any]:
    def compute_score(
        data_source: Any = None, solution_str: Any = None, ground_truth: Any = None, extra_info: Any = None, **_: Any
    ) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(extra_info, list):  # batch reward manager: lists in, a list out
            return _scores(client, task, extra_info)
        if extra_info is None:
            raise ValueError("extra_info must carry the images and texts to score")
        return _scores(client, task, [extra_info])[0]

    return compute_score
