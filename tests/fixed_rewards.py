"""A rollout worker on a tiny pipeline whose critic stands in for the reward server with fixed rewards:
for tests of the RL math that need no server."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from rl_workers.generators import load_generator
from rl_workers.generators.base import Condition
from rl_workers.rewards import GroupRewards
from rl_workers.settings import RolloutSettings
from rl_workers.worker import RolloutWorker
from tests.support import picture

DEFAULT_REWARDS: list[float | None] = [0.0, 0.25, 0.5, 1.0]


class FixedRewards:
    """Stands in for the reward server: every group gets the same rewards; the last images sent are kept."""

    def __init__(self, rewards: list[float | None]) -> None:
        self.rewards = rewards

    def submit(self, condition: Condition, images: list[Image.Image], source: Image.Image | None = None) -> Any:
        self.images = images
        rewards = GroupRewards(list(self.rewards), {})
        return type("Done", (), {"result": lambda _: rewards})()


def fixed_reward_worker(settings: RolloutSettings, rewards: list[float | None] | None = None) -> RolloutWorker:
    """A worker on CPU for `settings`, always on one prompt ("a red square", an edit of a blue picture)."""
    generator = load_generator(settings, torch.device("cpu"))
    condition = Condition("a red square", picture("blue") if settings.task == "edit" else None, id="c")
    critic = FixedRewards(rewards or DEFAULT_REWARDS)
    return RolloutWorker(settings, generator, critic, iter([condition] * 100))  # type: ignore[arg-type]
