"""How much of a rollout worker's wall time goes to waiting for rewards, with overlap on and off.

Starts `firm-serve --tiny` (or uses --url), builds a worker on a tiny SD3 or Qwen-Image-Edit
pipeline, runs a few GRPO steps in each mode and prints the time split. With overlap on, a group
is scored while the next one samples, so the worker waits only for the last group of a step.

    python bench/rollout_overlap.py                     # tiny pipelines, tiny critic, both modes
    python bench/rollout_overlap.py --task edit --groups-per-step 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prompt_files import Prompt, write_prompt_file
from rl_workers.generators import load_generator
from rl_workers.prompts import endless, load_conditions
from rl_workers.rewards import RemoteCritic
from rl_workers.settings import RolloutSettings
from rl_workers.tasks import FORMER_TASK_NAMES, ROLLOUT_TASKS
from rl_workers.worker import RolloutWorker, Timings
from tests.support import picture, running_server


def _prompts(folder: Path) -> Path:
    """Three prompts in a file every task reads: squares to draw, and squares to paint red."""
    shown, sources = ("red", "blue", "green"), ("blue", "green", "purple")
    prompts = [
        Prompt(f"a {colour} square on a grey background", picture(source), "Make the square red.")
        for colour, source in zip(shown, sources, strict=True)
    ]
    return write_prompt_file(folder, prompts)


def measure(settings: RolloutSettings, url: str, steps: int) -> Timings:
    """Run `steps` training steps (after one warm-up step) and return the summed time split."""
    critic = RemoteCritic(settings.task, [url], score_mode="expected")
    try:
        generator = load_generator(settings, torch.device("cpu"))
        conditions = endless(load_conditions(settings.prompts, settings.task), settings.seed)
        worker = RolloutWorker(settings, generator, critic, conditions)
        worker.step()
        total = Timings()
        for _ in range(steps):
            t = worker.step().timings
            total.sampling += t.sampling
            total.reward_wait += t.reward_wait
            total.training += t.training
        return total
    finally:
        critic.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", choices=[*ROLLOUT_TASKS, *FORMER_TASK_NAMES], default=RolloutSettings.model_fields["task"].default
    )
    parser.add_argument("--url", help="a running reward server; default: start firm-serve --tiny")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (after one warm-up step)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, help="where the tiny models are built (default: a temp folder)")
    args = parser.parse_args()

    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cache = args.cache_dir or root / "cache"
        # no answer cache, and a seed per mode: the second mode must not be answered from the first one's calls
        url = args.url or stack.enter_context(running_server(cache, "--max-wait-ms", "20", "--cache-size", "0"))
        prompts = _prompts(root / "prompts")
        print(f"task={args.task} G={args.group_size} groups/step={args.groups_per_step} steps={args.steps}")
        print(f"{'overlap':>8} {'sampling s':>11} {'waiting s':>10} {'training s':>11} {'waiting share':>14}")
        for overlap in (False, True):
            settings = RolloutSettings(
                task=args.task,
                tiny=True,
                cache_dir=cache,
                prompts=prompts,
                output_dir=root / "out",
                resolution=args.resolution,
                group_size=args.group_size,
                groups_per_step=args.groups_per_step,
                sample_steps=args.sample_steps,
                max_sequence_length=16,
                overlap=overlap,
                seed=int(overlap),
                progress=False,
                tensorboard=False,
            )
            t = measure(settings, url, args.steps)
            wall = t.sampling + t.reward_wait + t.training
            share = t.reward_wait / wall if wall else 0.0
            mode = "on" if overlap else "off"
            print(f"{mode:>8} {t.sampling:11.2f} {t.reward_wait:10.2f} {t.training:11.2f} {share:14.1%}")


if __name__ == "__main__":
    main()
