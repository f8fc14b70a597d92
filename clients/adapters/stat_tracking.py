"""Per-prompt advantages for the FIRM release's NFT trainers that leave a failed item out of its group.

The release's trainers gather every rank's rewards and hand them, with the prompts, to their
`PerPromptStatTracker`: per prompt, `(reward - mean) / (std + 1e-4)` over that prompt's rewards
since the last `clear()` (with `global_std`, the std of all the update's rewards instead). Its
sampler deals each prompt's group over all ranks, so one reward call holds only part of a group,
and no value the reward function puts in a failed item's place can keep it out of the statistics
the tracker takes over the whole group. These trackers take the same arguments and return the same
values, and read NaN as "no reward": a NaN item is in no mean and no standard deviation, and its
advantage is 0. With the reward function's `on_failure="nan"`, a failed item teaches nothing and
its groupmates get the advantages they would have had had it never been sampled, on any number of
ranks. With no NaN, the advantages are exactly the release's.

- `PerPromptStatTracker(global_std)`: the text-to-image trainers' tracker
  (`generation/flow_grpo/stat_tracking.py`); `update` returns the advantages.
- `BanningPerPromptStatTracker(global_std, ban_std_thres, ban_mean_thres)`: the editing trainers'
  (`editing/flow_grpo/stat_tracking.py`); `update` returns `(advantages, stds, means)` and bans a
  prompt whose rewards have a small spread and a high mean.

    >>> tracker = PerPromptStatTracker()
    >>> tracker.update(["a", "a", "a", "b", "b"], [0.2, float("nan"), 0.6, 0.5, 0.5]).round(4).tolist()
    [-0.9995, 0.0, 0.9995, 0.0, 0.0]
    >>> tracker.get_stats()  # two scored items per prompt; two prompts seen
    (2.0, 2)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STD_EPSILON = 1e-4  # the release adds it to every std before dividing


@dataclass(frozen=True)
class PromptStats:
    """One prompt's figures in an update: which items are its, and its scored rewards since `clear()`."""

    key: Hashable
    members: np.ndarray  # boolean, over the items of the update
    rewards: np.ndarray  # the scored rewards, rows as the update's (one per item)


def failed_items(rewards: np.ndarray) -> np.ndarray:
    """True for each item (row) whose reward is NaN, in any of its columns."""
    if rewards.ndim == 1:
        return np.isnan(rewards)
    return np.isnan(rewards.reshape(len(rewards), -1)).any(axis=1)


class PerPromptStatTracker:
    """The release's text-to-image tracker, with NaN rewards left out (see the module docstring).

    `stats` holds each prompt's scored rewards since `clear()`; `history_prompts` the hashes of every
    prompt seen.
    """

    def __init__(self, global_std: bool = False) -> None:
        self.global_std = global_std
        self.stats: dict[Hashable, np.ndarray] = {}
        self.history_prompts: set[int] = set()

    def update(self, prompts: Sequence[Any], rewards: Any, exp: bool = False) -> np.ndarray:
        """Advantages, one per item in the shape of `rewards`; 0 where the reward is NaN. `exp` is accepted
        and unused, as in the release."""
        advantages, _ = self._advantages(prompts, rewards)
        return advantages

    def _advantages(self, prompts: Sequence[Any], rewards: Any) -> tuple[np.ndarray, list[PromptStats]]:
        keys = np.array(prompts)
        values = np.array(rewards, dtype=np.float64)
        if len(keys) != len(values):
            raise ValueError(f"prompts and rewards differ in length: {len(keys)} and {len(values)}")
        scored = ~failed_items(values)
        advantages = np.zeros_like(values)
        per_prompt = []
        for key in np.unique(keys):
            members = keys == key
            earlier = self.stats.get(key)
            fresh = values[members & scored]
            group = fresh if earlier is None else np.concatenate([earlier, fresh])
            self.stats[key] = group
            self.history_prompts.add(hash(key))
            per_prompt.append(PromptStats(key, members, group))
            if not len(group):
                continue  # no scored reward of this prompt: nothing to compare its items with
            mean = np.mean(group, axis=0, keepdims=True)
            spread = values[scored] if self.global_std else group
            std = np.std(spread, axis=0, keepdims=True) + STD_EPSILON
            advantages[members & scored] = (values[members & scored] - mean) / std
        return advantages, per_prompt

    def get_stats(self) -> tuple[float, int]:
        """(scored rewards per prompt since `clear()`, on average; prompts ever seen)."""
        average = sum(len(v) for v in self.stats.values()) / len(self.stats) if self.stats else 0
        return average, len(self.history_prompts)

    def clear(self) -> None:
        self.stats = {}

    def get_mean_of_top_rewards(self, top_percentage: float) -> float:
        """The mean over prompts of the mean of each prompt's top `top_percentage` percent of scored rewards
        (those at or above the percentile that leaves that share); 0.0 with none."""
        if not 0 <= top_percentage <= 100:
            raise ValueError(f"top_percentage must be between 0 and 100, got {top_percentage}")
        means = []
        for group in self.stats.values():
            if not group.size:
                continue
            if top_percentage == 100:
                means.append(np.mean(group))
                continue
            top = group[group >= np.percentile(group, 100 - top_percentage)]
            if top.size:
                means.append(np.mean(top))
        return float(np.mean(means)) if means else 0.0


class BanningPerPromptStatTracker(PerPromptStatTracker):
    """The release's editing tracker, with NaN rewards left out: also returns each item's prompt std (the
    mean over columns) and mean, and adds to `banned_prompts` a prompt whose scored rewards have a std
    under `ban_std_thres` and a mean over `ban_mean_thres`. A prompt with no scored reward has std and
    mean 0 and is not banned."""

    def __init__(self, global_std: bool = False, ban_std_thres: float = 0.05, ban_mean_thres: float = 0.9) -> None:
        super().__init__(global_std)
        self.ban_std_thres, self.ban_mean_thres = ban_std_thres, ban_mean_thres
        self.banned_prompts: set[Hashable] = set()

    def update(  # type: ignore[override]  # the editing trainers unpack three arrays
        self, prompts: Sequence[Any], rewards: Any, exp: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(advantages, stds, means), each in the shape of `rewards`."""
        advantages, per_prompt = self._advantages(prompts, rewards)
        stds, means = np.zeros_like(advantages), np.zeros_like(advantages)
        for prompt in per_prompt:
            if not len(prompt.rewards):
                continue
            mean = np.mean(prompt.rewards, axis=0, keepdims=True)
            prompt_std = np.std(prompt.rewards, axis=0, keepdims=True).mean()
            if prompt_std < self.ban_std_thres and mean.mean() > self.ban_mean_thres:
                self.banned_prompts.add(prompt.key)
            stds[prompt.members] = prompt_std
            means[prompt.members] = mean
        return advantages, stds, means
