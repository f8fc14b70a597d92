"""GRPO rollout workers on tiny SD3 / Qwen-Image-Edit pipelines against a live firm-serve (tiny critic)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from clients import RewardClient
from clients.retry import RetryPolicy
from rl_workers.distributed import Ranks
from rl_workers.generators import load_generator
from rl_workers.grpo import Rollout, UpdateStats, accumulate_gradients
from rl_workers.lora import reference_policy
from rl_workers.prompts import endless, load_conditions
from rl_workers.rewards import RemoteCritic
from rl_workers.sampling import sample, sde_step, step_log_prob
from rl_workers.settings import RolloutSettings
from rl_workers.tasks import ROLLOUT_TASKS
from rl_workers.tiny import ensure_tiny_pipeline
from rl_workers.worker import RolloutWorker, Timings
from tests.support import picture
from tests.torchrun_rollout import torchrun_gen_step

G = 4
SMALL = {
    "score_mode": "expected",
    "resolution": 64,
    "group_size": G,
    "groups_per_step": 2,
    "sample_steps": 2,
    "max_sequence_length": 16,
    "source_vae_side": 64,
    "source_vl_side": 64,
}


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    (root / "gen.txt").write_text("a red square on a grey background\n\na blue square on a grey background\n")
    for colour in ("blue", "green"):
        picture(colour).save(root / f"{colour}.png")
    (root / "edit.jsonl").write_text(
        '{"source": "blue.png", "instruction": "Make the square red.", "id": "e1"}\n'
        '{"source": "green.png", "instruction": "Paint the square yellow.", "id": "e2"}\n'
    )
    return {"gen": root / "gen.txt", "edit": root / "edit.jsonl"}


def _settings(task: str, cache_dir: Path, prompts: Path, tmp_path: Path, **extra: object) -> RolloutSettings:
    ensure_tiny_pipeline(cache_dir, ROLLOUT_TASKS[task].generator)
    fields = {**SMALL, "kl_beta": 0.04, "progress": False, "tensorboard": False} | extra
    return RolloutSettings(task=task, tiny=True, cache_dir=cache_dir, prompts=prompts, output_dir=tmp_path, **fields)


def _worker(settings: RolloutSettings, critic: RemoteCritic) -> RolloutWorker:
    generator = load_generator(settings, torch.device("cpu"))
    conditions = endless(load_conditions(settings.prompts, settings.task), settings.seed)
    return RolloutWorker(settings, generator, critic, conditions)


@contextmanager
def _served_worker(settings: RolloutSettings, url: str) -> Iterator[RolloutWorker]:
    """A worker whose critic is the live server at `url` (closed on the way out)."""
    critic = RemoteCritic(settings.task, url, score_mode=settings.score_mode)
    try:
        yield _worker(settings, critic)
    finally:
        critic.close()


def _one_group(settings: RolloutSettings, url: str) -> tuple[RolloutWorker, Rollout]:
    """A worker and one group it sampled and had scored."""
    with _served_worker(settings, url) as worker:
        (rollout,) = worker.sample_groups([next(worker.conditions)], Timings())
    return worker, rollout


@pytest.mark.parametrize("task", ["gen", "edit"])
def test_one_training_step(task: str, server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path) -> None:
    # two optimizer steps: the second mini-batch meets a policy the first one moved (large lr: it shows)
    settings = _settings(task, cache_dir, prompt_files[task], tmp_path, learning_rate=0.05, clip_range=1e-6)
    with _served_worker(settings, server_url) as worker:
        lora_b = [p for name, p in worker.generator.transformer.named_parameters() if "lora_B" in name]
        assert lora_b and all(float(p.detach().abs().sum()) == 0 for p in lora_b)  # the policy starts as the base model
        result = worker.step()

    assert len(result.rollouts) == 2
    for rollout in result.rollouts:
        trajectory = rollout.trajectory
        assert trajectory.latents.shape[:2] == (G, 3) and trajectory.log_probs.shape == (G, 2)
        # the server scored every candidate of the group with the task's reward and components
        assert rollout.rewards is not None and rollout.rewards.failed == 0
        assert all(0.0 <= r <= 1.0 for r in rollout.rewards.rewards)
        names = {"gen": {"instruction_following", "quality"}, "edit": {"execution", "consistency"}}[task]
        assert set(rollout.rewards.components) == names
        # advantages are the rewards normalised within the group
        adv = rollout.advantages
        assert adv is not None
        rewards = torch.tensor(rollout.rewards.rewards, dtype=torch.float64)
        if adv.zero_spread:
            assert float(rewards.std(unbiased=False)) < 1e-6 and not adv.mask.any()
        else:
            expected = (rewards - rewards.mean()) / max(float(rewards.std(unbiased=False)), settings.std_floor)
            assert torch.allclose(adv.advantages.double(), expected, atol=1e-5)
            assert abs(float(adv.advantages.sum())) < 1e-4

    trained = sum(int(r.advantages.mask.sum()) for r in result.rollouts if r.advantages is not None)
    assert result.update.samples == trained and trained > 0
    assert result.update.optimizer_steps == 2
    # the first mini-batch ran on the policy that sampled (ratio 1); the second on a moved one, so it clipped
    assert result.update.max_ratio_deviation > 1e-6 and result.update.clipped > 0
    # only a gradient can move B away from zero (weight decay keeps zero at zero)
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)
    figures = result.figures
    assert figures["groups/total"] == 2 and figures["reward/failed_fraction"] == 0.0
    assert math.isclose(
        figures["reward/mean"],
        float(torch.tensor([r for ro in result.rollouts for r in ro.rewards.rewards]).mean()),
        rel_tol=1e-6,
    )


def test_recorded_log_probs_match_recomputed(
    server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path
) -> None:
    settings = _settings("edit", cache_dir, prompt_files["edit"], tmp_path, groups_per_step=1)
    worker, rollout = _one_group(settings, server_url)
    for j in range(rollout.trajectory.steps):
        with torch.no_grad():
            step = step_log_prob(
                worker.generator,
                rollout.conditioning,
                rollout.trajectory,
                slice(None),
                j,
                noise_level=settings.noise_level,
            )
        assert torch.allclose(step.log_prob, rollout.trajectory.log_probs[:, j], atol=1e-4)
    # and a changed policy gives different log-probs, so the check above can fail
    with torch.no_grad():
        for p in worker.params:
            p.add_(0.5)
        moved = step_log_prob(
            worker.generator, rollout.conditioning, rollout.trajectory, slice(None), 0, noise_level=settings.noise_level
        )
    assert not torch.allclose(moved.log_prob, rollout.trajectory.log_probs[:, 0], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sde_step_density_is_of_the_stored_step(dtype: torch.dtype) -> None:
    """A bf16 model on a GPU: the step is taken and stored in float32, and its density is of that step."""
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=rng).to(dtype)
    v = torch.randn(3, 4, 8, 8, generator=rng).to(dtype)
    step = sde_step(x, v, 0.8, 0.6, noise_level=0.7, sigma_cap=0.9, generator=rng)
    assert step.next_latents.dtype == torch.float32
    again = sde_step(x, v, 0.8, 0.6, noise_level=0.7, sigma_cap=0.9, next_latents=step.next_latents)
    assert torch.allclose(step.log_prob, again.log_prob, atol=1e-6)
    other = sde_step(x, v + 0.5, 0.8, 0.6, noise_level=0.7, sigma_cap=0.9, next_latents=step.next_latents)
    assert not torch.allclose(step.log_prob, other.log_prob, atol=1e-3)


def _gradients(worker: RolloutWorker, rollouts: list, kl_beta: float = 0.0) -> tuple[list[torch.Tensor], UpdateStats]:
    """The gradients of one mini-batch holding every trainable sample (the worker's own selection)."""
    (rows,) = worker._mini_batches(rollouts)
    worker.optimizer.zero_grad(set_to_none=True)
    stats = UpdateStats()
    accumulate_gradients(
        worker.generator, rollouts, rows, stats, step_indices=[0, 1], noise_level=0.7, clip_range=0.2,
        kl_beta=kl_beta, batch_size=2, norm=1.0,
    )  # fmt: skip
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in worker.params], stats


def test_masked_items_contribute_nothing(server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path) -> None:
    settings = _settings("gen", cache_dir, prompt_files["gen"], tmp_path, groups_per_step=1, updates_per_step=1)
    worker, rollout = _one_group(settings, server_url)
    with torch.no_grad():  # B = 0: the policy that sampled is the base model
        base_velocity = worker.generator.velocity(
            rollout.trajectory.latents[:, 0], rollout.trajectory.timesteps[0], rollout.conditioning
        )
    with torch.no_grad():  # a policy away from the sampling one, so the gradients are not trivially zero
        for p in worker.params:
            p.add_(0.05)
    rollout.advantages = type(rollout.advantages)(
        torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([False, True, True, True]), False
    )
    base, _ = _gradients(worker, [rollout])
    (rows,) = worker._mini_batches([rollout])
    assert [r.tolist() for r in rows] == [[1, 2, 3]]  # the masked sample is never selected
    assert any(float(g.abs().sum()) > 0 for g in base)

    garbage = copy.copy(rollout)
    garbage.trajectory = copy.copy(rollout.trajectory)
    garbage.trajectory.latents = rollout.trajectory.latents.clone()
    garbage.trajectory.latents[0] += 3.0 * torch.randn_like(garbage.trajectory.latents[0])
    garbage.advantages = type(rollout.advantages)(
        torch.tensor([100.0, -1.0, 0.5, -0.5]), rollout.advantages.mask, False
    )
    for a, b in zip(base, _gradients(worker, [garbage])[0], strict=True):
        assert torch.allclose(a, b)
    # unmasked, the same change does move the gradients
    garbage.advantages = type(rollout.advantages)(
        torch.tensor([100.0, -1.0, 0.5, -0.5]), torch.ones(4, dtype=torch.bool), False
    )
    assert any(not torch.allclose(a, b) for a, b in zip(base, _gradients(worker, [garbage])[0], strict=True))

    # the KL term: zero against the reference while LoRA is off, positive once the policy moved
    velocity = worker.generator.velocity
    x, t = rollout.trajectory.latents[:, 0], rollout.trajectory.timesteps[0]
    with torch.no_grad(), reference_policy(worker.generator.transformer):
        reference = velocity(x, t, rollout.conditioning)
    with torch.no_grad():
        moved = velocity(x, t, rollout.conditioning)
    assert torch.allclose(reference, base_velocity, atol=1e-6) and not torch.allclose(reference, moved)
    assert _gradients(worker, [rollout], kl_beta=1.0)[1].kl > 0


def test_unreachable_server_gives_masked_failures_not_zeros(
    cache_dir: Path, prompt_files: dict, tmp_path: Path
) -> None:
    settings = _settings("gen", cache_dir, prompt_files["gen"], tmp_path, groups_per_step=1)
    client = RewardClient("http://127.0.0.1:9", timeout_s=5, retry=RetryPolicy(max_attempts=1))
    critic = RemoteCritic("gen", client=client)
    try:
        worker = _worker(settings, critic)
        result = worker.step()
    finally:
        critic.close()
    (rollout,) = result.rollouts
    assert rollout.rewards.rewards == [None] * G and len(rollout.rewards.errors) == G
    assert not rollout.advantages.mask.any()
    assert result.update.samples == 0
    assert result.figures["reward/failed_fraction"] == 1.0 and math.isnan(result.figures["reward/mean"])
    assert math.isnan(result.figures["train/loss"]) and math.isnan(result.figures["train/kl"])  # not a calm 0


def _refuse(constant: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")


def test_firm_rollout_cli_trains_and_saves(
    server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path
) -> None:
    ensure_tiny_pipeline(cache_dir, "sd3")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "rl_workers.cli", "--tiny", "--task", "gen", "--cache-dir", str(cache_dir),
        "--prompts", str(prompt_files["gen"]), "--reward-url", server_url, "--output-dir", str(out),
        "--resolution", "64", "--group-size", "4", "--groups-per-step", "1", "--sample-steps", "2",
        "--max-sequence-length", "16", "--score-mode", "expected", "--steps", "2", "--save-every", "1",
        "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line, parse_constant=_refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for key in ("reward/mean", "reward/instruction_following", "reward/quality", "reward/failed_fraction",
                "groups/zero_spread", "train/kl", "train/clip_fraction", "time/sampling_s", "time/reward_wait_s",
                "time/training_s"):  # fmt: skip
        assert key in lines[0]
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((checkpoint / "firm_rollout.json").read_text())["settings"]["group_size"] == 4


def test_torchrun_workers_share_the_step_figures(
    server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path
) -> None:
    """Two ranks under torchrun (gloo on CPU): each samples its own group, the logged figures cover both."""
    line = torchrun_gen_step(server_url, cache_dir, prompt_files["gen"], tmp_path / "ddp", group_size=4)
    assert line["groups/total"] == 2 and line["train/samples"] == 8


@pytest.mark.parametrize(("flag", "value"), [("--group-size", "1"), ("--resolution", "72")])
def test_firm_rollout_rejects_bad_settings(flag: str, value: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rl_workers.cli", "--prompts", str(tmp_path / "p.txt"), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and (flag in done.stderr or "resolution" in done.stderr)


def test_every_rank_starts_from_the_same_adapter(cache_dir: Path, prompt_files: dict, tmp_path: Path) -> None:
    settings = _settings("gen", cache_dir, prompt_files["gen"], tmp_path)
    client = RewardClient("http://127.0.0.1:9")
    critic = RemoteCritic("gen", client=client)
    try:
        workers = [
            RolloutWorker(settings, load_generator(settings, torch.device("cpu")), critic, iter([]), Ranks(rank, 1))
            for rank in (0, 1)
        ]
    finally:
        critic.close()
    for a, b in zip(workers[0].params, workers[1].params, strict=True):
        assert torch.equal(a, b)
    assert any(float(p.detach().abs().sum()) > 0 for p in workers[0].params)  # A is random, not zero


def test_checkpoint_reloads_at_the_strength_it_trained(
    server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path
) -> None:
    """A saved adapter loaded with diffusers' `load_lora_weights` predicts what the trained policy predicts."""
    settings = _settings("gen", cache_dir, prompt_files["gen"], tmp_path, groups_per_step=1, lora_rank=4, lora_alpha=8)
    worker, rollout = _one_group(settings, server_url)
    with torch.no_grad():
        for p in worker.params:
            p.add_(0.05)
        x, t = rollout.trajectory.latents[:, 0], rollout.trajectory.timesteps[0]
        trained = worker.generator.velocity(x, t, rollout.conditioning)
    worker.save(1)
    fresh = load_generator(settings, torch.device("cpu"))
    with torch.no_grad():
        base = fresh.velocity(x, t, rollout.conditioning)
        fresh.pipeline.load_lora_weights(str(tmp_path / "checkpoint-1"))
        reloaded = fresh.velocity(x, t, rollout.conditioning)
    assert not torch.allclose(base, trained, atol=1e-4)
    assert torch.allclose(reloaded, trained, atol=1e-5)


def test_evaluation_samples_with_the_ode(server_url: str, cache_dir: Path, prompt_files: dict, tmp_path: Path) -> None:
    settings = _settings("edit", cache_dir, prompt_files["edit"], tmp_path, eval_steps=2)
    with _served_worker(settings, server_url) as worker:
        generator = worker.generator
        conditioning, latents = generator.prepare(next(worker.conditions), G, torch.Generator().manual_seed(1))
        runs = [sample(generator, conditioning, latents, steps=2, noise_level=0.7, sde=False) for _ in range(2)]
        score = worker.evaluate()
    assert torch.equal(runs[0].latents, runs[1].latents)  # deterministic: no noise drawn
    assert not runs[0].log_probs.any()
    assert 0.0 <= score <= 1.0
