"""A TRL GRPO `reward_funcs` entry: (prompts, completions, **columns) -> list[float | None].

TRL treats None as "no reward for this sample" and leaves it out, which is how a failed item
is reported here. The generated images come from the `images` column (or the completions
themselves when they are images); editing also needs a `source` column.

    >>> from clients import RewardClient                                        # doctest: +SKIP
    >>> trainer = GRPOTrainer(..., reward_funcs=[firm_reward(RewardClient(), "gen")])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from clients.client import RewardClient

TrlRewardFunc = Callable[..., list[float | None]]


def _prompt_text(prompt: Any) -> str:
    """TRL passes plain strings or chat messages; take the last user text."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [part.get("text", "") for part in content or [] if part.get("type") == "text"]
        if texts:
            return " ".join(texts)
    raise ValueError("no text found in the prompt")


def firm_reward(client: RewardClient, task: Literal["gen", "edit"]) -> TrlRewardFunc:
    def firm(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        images = columns.get("images", completions)
        texts = [_prompt_text(p) for p in prompts]
        if task == "gen":
            reply = client.score_generations(list(images), texts, requirements=columns.get("requirement"))
        else:
            reply = client.score_edits(list(columns["source"]), list(images), texts)
        return [r.reward for r in reply.results]

    firm.__name__ = f"firm_{task}"  # TRL logs each reward function under its name
    return firm
