"""The drop-in trackers for the FIRM release's NFT trainers: exactly the release's advantages when every item
was scored, and a NaN item left out of its prompt's statistics.

The reference below is written from what the release's trackers do (VisionXLab/FIRM-Reward at ba41493,
generation/flow_grpo/stat_tracking.py and editing/flow_grpo/stat_tracking.py, `update`): per prompt of an
update, the mean and the population std (over the items, per column) of that prompt's rewards since the last
`clear()`, earlier updates' first; the advantage is (reward - mean) / (std + 1e-4), where with `global_std` the
std is that of all the update's rewards. The editing tracker also returns, per item, its prompt's std
averaged over the columns and its prompt's mean, and bans a prompt whose std is under a threshold while its
mean is over another.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clients.adapters.flow_grpo import BanningPerPromptStatTracker, PerPromptStatTracker

NAN = math.nan


def prompt_rows(history: list[tuple[list[str], np.ndarray]], key: str) -> np.ndarray:
    """A prompt's rewards over the updates since `clear()`, in the order they came, one row per item."""
    return np.array([row for prompts, rewards in history for p, row in zip(prompts, rewards, strict=True) if p == key])


def reference(
    history: list[tuple[list[str], np.ndarray]], global_std: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The release's (advantages, per-item prompt std, per-item prompt mean) for the last update of `history`."""
    prompts, rewards = history[-1]
    advantages, stds, means = (np.zeros_like(rewards) for _ in range(3))
    for key in set(prompts):
        rows = prompt_rows(history, key)
        mine = np.array([p == key for p in prompts])
        mean = rows.mean(axis=0)
        std = (rewards.std(axis=0) if global_std else rows.std(axis=0)) + 1e-4
        advantages[mine] = (rewards[mine] - mean) / std
        stds[mine] = rows.std(axis=0).mean()
        means[mine] = mean
    return advantages, stds, means


def step(rng: np.random.Generator, prompts: int, group: int, columns: int, ties: bool) -> tuple[list[str], np.ndarray]:
    """One gathered step as the trainers hand it over: each prompt `group` times, shuffled, float32 rewards
    widened to float64, repeated over `columns` timesteps (none: one reward per item)."""
    keys = [f"prompt {i}" for i in range(prompts) for _ in range(group)]
    order = rng.permutation(len(keys))
    values = rng.random(len(keys)).astype(np.float32)
    if ties:
        values = np.round(values * 4) / 4  # few distinct rewards: equal groups, zero std
    rewards = values.astype(np.float64) if columns == 0 else np.repeat(values[:, None], columns, 1).astype(np.float64)
    return [keys[i] for i in order], rewards[order]


CASES = [  # (prompts, group size, timesteps, global std, ties)
    (2, 4, 3, False, False),
    (3, 8, 0, False, True),
    (1, 24, 10, False, False),  # a group large enough for numpy's pairwise sums
    (5, 9, 2, True, False),
    (4, 16, 1, True, True),
]


def banned(keys: list[str], rewards: np.ndarray, std_below: float, mean_above: float) -> set[str]:
    return {
        key
        for key in set(keys)
        if (rows := prompt_rows([(keys, rewards)], key)).std(axis=0).mean() < std_below and rows.mean() > mean_above
    }


@pytest.mark.parametrize(("prompts", "group", "columns", "global_std", "ties"), CASES)
def test_the_release_advantages_exactly_when_nothing_failed(
    prompts: int, group: int, columns: int, global_std: bool, ties: bool
) -> None:
    rng = np.random.default_rng(prompts * 100 + group)
    keys, rewards = step(rng, prompts, group, columns, ties)
    if ties:
        rewards[[k == "prompt 0" for k in keys]] = 1.0  # a saturated prompt, which the editing tracker bans
    advantages, stds, means = reference([(keys, rewards)], global_std)
    np.testing.assert_array_equal(PerPromptStatTracker(global_std).update(keys, rewards), advantages)
    banning = BanningPerPromptStatTracker(global_std, 0.05, 0.6)
    for got, expected in zip(banning.update(keys, rewards), (advantages, stds, means), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert banning.banned_prompts == banned(keys, rewards, 0.05, 0.6)
    assert ("prompt 0" in banning.banned_prompts) == ties


def test_updates_before_clear_share_a_prompts_statistics() -> None:
    rng = np.random.default_rng(7)
    tracker = PerPromptStatTracker()
    first, second = step(rng, 2, 4, 2, False), step(rng, 2, 4, 2, False)
    tracker.update(*first)
    np.testing.assert_array_equal(tracker.update(*second), reference([first, second])[0])
    assert tracker.get_stats() == (8.0, 2)
    tracker.clear()
    np.testing.assert_array_equal(tracker.update(*second), reference([second])[0])
    assert tracker.get_stats() == (4.0, 2)


def test_a_nan_item_is_in_no_statistic_and_gets_advantage_zero() -> None:
    keys = ["a", "b", "a", "a", "b", "c", "b", "a", "c"]
    values = np.array([0.9, 0.1, NAN, 0.3, 0.7, NAN, 0.4, 0.6, NAN])
    rewards = np.repeat(values[:, None], 3, axis=1)
    scored = ~np.isnan(values)
    kept = [k for k, keep in zip(keys, scored, strict=True) if keep]
    for global_std in (False, True):
        advantages = PerPromptStatTracker(global_std).update(keys, rewards)
        assert (advantages[~scored] == 0).all()  # "c" has no scored item at all: both of its items get 0
        np.testing.assert_array_equal(advantages[scored], reference([(kept, rewards[scored])], global_std)[0])
    tracker = PerPromptStatTracker()
    tracker.update(keys, rewards)
    clean = PerPromptStatTracker()
    clean.update(kept, rewards[scored])
    assert tracker.get_stats() == (2.0, 3)  # 3 + 3 + 0 scored items over three prompts
    for share in (100, 75, 50, 25, 10):
        assert tracker.get_mean_of_top_rewards(share) == clean.get_mean_of_top_rewards(share)
        assert math.isfinite(tracker.get_mean_of_top_rewards(share))


def test_the_banning_tracker_with_failed_items() -> None:
    keys = ["a", "a", "a", "b", "b", "c"]
    rewards = np.array([1.0, 1.0, NAN, 0.2, 0.8, NAN])
    tracker = BanningPerPromptStatTracker(False, 0.05, 0.9)
    advantages, stds, means = tracker.update(keys, rewards)
    assert tracker.banned_prompts == {"a"}  # its scored rewards are all 1.0: no spread, high mean
    assert advantages.tolist() == [
        0.0,
        0.0,
        0.0,
        pytest.approx(-0.9997, abs=1e-4),
        pytest.approx(0.9997, abs=1e-4),
        0.0,
    ]
    assert stds.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3, 0.3, 0.0])  # "c": nothing scored, std and mean 0
    assert means.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.0])


def test_refusals() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        PerPromptStatTracker().update(["a", "b"], [0.1])
    with pytest.raises(ValueError, match="top_percentage"):
        PerPromptStatTracker().get_mean_of_top_rewards(101)
    assert PerPromptStatTracker().get_mean_of_top_rewards(50) == 0.0
