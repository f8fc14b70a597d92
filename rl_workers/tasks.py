"""What a rollout worker does for each critic's task: one entry per task of `clients.tasks.TASKS`.

An entry names the generator that samples for the task and its defaults (one recipe per training
algorithm), reads one line of the task's prompt file, and sends a sampled group to the reward
server's group route. The worker, the prompt loader, the critic and the settings read the entry;
none of them branches on the task.

    >>> ROLLOUT_TASKS["gen"].generator, ROLLOUT_TASKS["edit"].spec.dimensions
    ('sd3', ('execution', 'consistency'))
    >>> ROLLOUT_TASKS["gen"].recipes["nft"].group_size, ROLLOUT_TASKS["edit"].recipes["nft"].sample_steps
    (24, 6)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from clients.protocol import ScoringResponse, Task
from clients.tasks import EDIT, GEN, TaskSpec, task_spec
from rl_workers.recipes import ALGORITHM_NAMES, Recipe

if TYPE_CHECKING:
    from clients.client import RewardClient
    from rl_workers.generators.base import Condition

# Starts a group's call: (client, condition, images, source image or None, options) -> the reply's future.
GroupCall = Callable[
    ["RewardClient", "Condition", Sequence[Image.Image], "Image.Image | None", dict[str, Any]],
    "Future[ScoringResponse]",
]


@dataclass(frozen=True)
class RolloutTask:
    """One task as the rollout workers see it."""

    spec: TaskSpec  # the critic's task on the wire: its reward, dimensions and routes
    generator: str  # which generator samples for it (and which tiny pipeline stands in for it)
    generator_title: str  # that generator, in words
    model: str  # its default checkpoint
    recipes: dict[str, Recipe]  # each training algorithm's defaults for the task
    train_batch: int  # samples per forward pass of the update that fit beside it
    prompt_file: str  # what a line of the task's prompt file holds, in words
    read_line: Callable[[str, Path, str], Condition]  # (line, the file's folder, default id) -> condition
    submit_group: GroupCall  # starts scoring a group on the task's group route, without waiting


def _prompt_line(text: str, root: Path, default_id: str) -> Condition:
    """A text prompt, or a JSONL record with "prompt" (and an optional "id")."""
    from rl_workers.generators.base import Condition  # with torch: only once prompts are read

    if text.startswith("{"):
        record = json.loads(text)
        return Condition(prompt=record["prompt"], id=str(record.get("id", default_id)))
    return Condition(prompt=text, id=default_id)


def _edit_line(text: str, root: Path, default_id: str) -> Condition:
    """A JSONL record with "source" (an image path, relative to the file) and "instruction"."""
    from rl_workers.generators.base import Condition

    record = json.loads(text)
    source = Path(record["source"])
    with Image.open(source if source.is_absolute() else root / source) as image:
        image.load()
        return Condition(
            prompt=record["instruction"], source=image.convert("RGB"), id=str(record.get("id", default_id))
        )


def _gen_group(
    client: RewardClient,
    condition: Condition,
    images: Sequence[Image.Image],
    source: Image.Image | None,
    options: dict[str, Any],
) -> Future[ScoringResponse]:
    return client.submit_generation_group(condition.prompt, list(images), **options)


def _edit_group(
    client: RewardClient,
    condition: Condition,
    images: Sequence[Image.Image],
    source: Image.Image | None,
    options: dict[str, Any],
) -> Future[ScoringResponse]:
    """Edits are judged against `source` when given, else the condition's own source image."""
    source = source if source is not None else condition.source
    return client.submit_edit_group(source, condition.prompt, list(images), **options)


def _flow_grpo(guidance: float) -> Recipe:
    """Flow-GRPO's defaults (its SD3.5 config), which only the task's guidance scale changes."""
    return Recipe(
        group_size=16,
        sample_steps=10,
        eval_steps=40,
        guidance_scale=guidance,
        learning_rate=3e-4,
        kl_beta=0.04,
        updates_per_step=2,
        ema_decay=0.0,
        train_tied_groups=False,
    )


def _release_nft(*, group_size: int, sample_steps: int, eval_steps: int, learning_rate: float) -> Recipe:
    """The FIRM release's DiffusionNFT configs: what both share, with each config's own values given."""
    return Recipe(
        group_size=group_size,
        sample_steps=sample_steps,
        eval_steps=eval_steps,
        guidance_scale=1.0,  # no classifier-free guidance
        learning_rate=learning_rate,
        kl_beta=1e-4,
        updates_per_step=1,
        ema_decay=0.9,
        train_tied_groups=True,
    )


ROLLOUT_TASKS: dict[Task, RolloutTask] = {
    entry.spec.name: entry
    for entry in (
        RolloutTask(
            spec=GEN,
            generator="sd3",
            generator_title="Stable Diffusion 3.5",
            model="stabilityai/stable-diffusion-3.5-medium",
            recipes={
                "grpo": _flow_grpo(guidance=4.5),  # Flow-GRPO's SD3.5 defaults
                # the release's generation/config/nft.py, sd3_sharegpt_qwenvl (FIRM-SD3.5)
                "nft": _release_nft(group_size=24, sample_steps=10, eval_steps=40, learning_rate=3e-4),
            },
            train_batch=4,
            prompt_file='one text prompt per line, or JSONL of {"prompt"}',
            read_line=_prompt_line,
            submit_group=_gen_group,
        ),
        RolloutTask(
            spec=EDIT,
            generator="qwen_edit",
            generator_title="Qwen-Image-Edit",
            model="Qwen/Qwen-Image-Edit",
            recipes={
                "grpo": _flow_grpo(guidance=4.0),  # Flow-GRPO's defaults
                # the release's editing/config/qwen_image_edit_nft.py (FIRM-Qwen-Edit)
                "nft": _release_nft(group_size=12, sample_steps=6, eval_steps=15, learning_rate=1.5e-3),
            },
            train_batch=1,  # Qwen-Image-Edit's 20B transformer with true CFG fits one
            prompt_file='JSONL of {"source": an image path relative to the file, "instruction"}',
            read_line=_edit_line,
            submit_group=_edit_group,
        ),
    )
}

FORMER_TASK_NAMES = {"t2i": GEN.name}  # spellings of --task that are still accepted, with a warning


def rollout_task(name: str) -> RolloutTask:
    """The entry of a task by its name, with the known names in the error."""
    return ROLLOUT_TASKS[task_spec(name).name]


def per_task(describe: Callable[[RolloutTask], object]) -> str:
    """A setting's per-task values in words, for help texts: "4.5 (gen), 4.0 (edit)"."""
    return ", ".join(f"{describe(task)} ({name})" for name, task in ROLLOUT_TASKS.items())


def per_recipe(describe: Callable[[Recipe], object]) -> str:
    """A recipe setting's values per algorithm and task, for help texts: "grpo: 16; nft: 24 (gen), 12 (edit)"."""
    parts = []
    for algorithm in ALGORITHM_NAMES:
        values = {name: describe(task.recipes[algorithm]) for name, task in ROLLOUT_TASKS.items()}
        alike = len(set(map(str, values.values()))) == 1
        shown = next(iter(values.values())) if alike else ", ".join(f"{v} ({n})" for n, v in values.items())
        parts.append(f"{algorithm}: {shown}")
    return "; ".join(parts)
