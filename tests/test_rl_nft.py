"""The NFT algorithm (the FIRM release's recipe) on the tiny pipelines, on CPU: its sampler, its loss and
its sign, masking, the old adapter's schedule, the EMA and its checkpoints, and a two-rank run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_workers.advantages import GroupAdvantages
from rl_workers.dpm_solver import dpm2_step, sample_dpm2
from rl_workers.generators import load_generator
from rl_workers.generators.base import Condition
from rl_workers.nft import OLD_DECAY_SCHEDULES, NFTStats, nft_loss, old_decay
from rl_workers.prompts import endless
from rl_workers.rewards import RemoteCritic
from rl_workers.settings import RECIPE_SETTINGS, RolloutSettings
from rl_workers.tasks import ROLLOUT_TASKS
from rl_workers.tiny import ensure_tiny_pipeline
from rl_workers.worker import RolloutWorker, Timings
from tests.fixed_rewards import fixed_reward_worker
from tests.support import picture
from tests.torchrun_rollout import torchrun_gen_step

G = 4
CPU = torch.device("cpu")
SMALL: dict[str, Any] = {
    "algorithm": "nft", "resolution": 64, "group_size": G, "groups_per_step": 1, "sample_steps": 3,
    "max_sequence_length": 16, "source_vae_side": 64, "source_vl_side": 64, "progress": False, "tensorboard": False,
}  # fmt: skip


def _settings(task: str, cache_dir: Path, tmp_path: Path, **extra: Any) -> RolloutSettings:
    ensure_tiny_pipeline(cache_dir, ROLLOUT_TASKS[task].generator)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on a grey background\n")
    return RolloutSettings(
        task=task, tiny=True, cache_dir=cache_dir, prompts=prompts, output_dir=tmp_path / "out", **(SMALL | extra)
    )


def test_the_recipes_are_the_releases(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    gen, edit = (RolloutSettings(task=t, algorithm="nft", prompts=prompts) for t in ("gen", "edit"))
    assert (gen.group_size, gen.sample_steps, gen.guidance, gen.kl_beta, gen.learning_rate) == (24, 10, 1.0, 1e-4, 3e-4)
    assert (edit.group_size, edit.sample_steps, edit.eval_steps, edit.learning_rate) == (12, 6, 15, 1.5e-3)
    assert (gen.nft_beta, gen.old_decay_type, gen.ema_decay, gen.updates_per_step, gen.adv_clip) == (1.0, 1, 0.9, 1, 5)
    grpo = RolloutSettings(task="gen", prompts=prompts)
    assert (grpo.algorithm, grpo.group_size, grpo.guidance, grpo.kl_beta, grpo.ema_decay) == ("grpo", 16, 4.5, 0.04, 0)
    assert RolloutSettings(task="gen", algorithm="nft", prompts=prompts, group_size=8).group_size == 8  # flags win
    assert OLD_DECAY_SCHEDULES[1] == (0, 0.001, 0.5)
    # each recipe field is the default of the rollout setting of its name, a setting left unset (None) until then
    for name in RECIPE_SETTINGS:
        assert name in RolloutSettings.model_fields and RolloutSettings.model_fields[name].default is None, name


def test_dpm2_step_is_dpm_solver_pp_2m_when_the_clean_estimate_moves() -> None:
    """The second-order term, written out from DPM-Solver++(2M): x' = (s'/s) x - a' (e^-h - 1) (x0 + (x0 - x0p) / 2r),
    with lambda = log(a / s), h = lambda' - lambda and r the previous step's h over this one's."""
    x, x0, previous = torch.tensor([0.3, -1.2]), torch.tensor([0.8, 0.1]), torch.tensor([0.2, 0.5])
    sigma_prev, sigma, sigma_next = 0.9, 0.6, 0.3

    def lam(s: float) -> float:
        return math.log((1 - s) / s)

    h, h_prev = lam(sigma_next) - lam(sigma), lam(sigma) - lam(sigma_prev)
    corrected = x0 + (x0 - previous) / (2 * h_prev / h)
    expected = (sigma_next / sigma) * x - (1 - sigma_next) * math.expm1(-h) * corrected
    assert torch.allclose(dpm2_step(x, x0, previous, (sigma_prev, sigma, sigma_next)), expected)


def test_dpm2_lands_on_the_clean_estimate_and_is_deterministic(cache_dir: Path, tmp_path: Path) -> None:
    target = torch.randn(2, 4, 8, 8)

    class Straight:  # the exact velocity toward `target`: every solver must land on it
        dtype = torch.float32

        def schedule(self, steps: int, latents: torch.Tensor) -> tuple[list[float], list[float]]:
            sigmas = [1.0 - i / steps * 0.9 for i in range(steps)] + [0.0]
            return sigmas, [s * 1000 for s in sigmas[:-1]]

        def velocity(self, x: torch.Tensor, timestep: float, conditioning: Any) -> torch.Tensor:
            return (x - target) / (timestep / 1000)

    noise = torch.randn(2, 4, 8, 8)
    trajectory = sample_dpm2(Straight(), None, noise, steps=5)  # type: ignore[arg-type]
    assert trajectory.latents.shape[:2] == (2, 6) and not trajectory.log_probs.any()
    assert torch.allclose(trajectory.latents[:, -1], target, atol=1e-5)
    worker = fixed_reward_worker(_settings("gen", cache_dir, tmp_path))
    conditioning, latents = worker.generator.prepare(next(worker.conditions), 2, torch.Generator().manual_seed(0))
    runs = [worker.algorithm.sample(worker.settings, conditioning, latents, torch.Generator()) for _ in range(2)]
    assert torch.equal(runs[0].latents, runs[1].latents)


def test_the_sign_of_the_advantage_on_one_sample() -> None:
    """r = 1 pulls the trained prediction's x0 estimate toward x0; r = 0 pushes it away."""
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 16), torch.randn(1, 16)
    sigma = 0.6
    x_t = (1 - sigma) * x0 + sigma * noise
    v_old = noise - x0 + 0.5 * torch.randn(1, 16)  # the sampler's prediction, off the exact velocity
    error = {}
    for advantage in (5.0, -5.0):
        v = v_old.clone().requires_grad_(True)
        terms = nft_loss(v, v_old, None, x_t, x0, sigma, torch.tensor([advantage]), beta=1.0, adv_clip=5.0, kl_beta=0.0)
        terms.loss.sum().backward()
        assert v.grad is not None
        moved = v.detach() - 0.01 * v.grad
        error[advantage] = float(((x_t - sigma * moved - x0) ** 2).sum())
    before = float(((x_t - sigma * v_old - x0) ** 2).sum())
    assert error[5.0] < before < error[-5.0]


def _x0_error(worker: RolloutWorker, rollout: Any, seed: int, rows: slice) -> float:
    """The x0 error of the trained prediction where a one-step update with `seed` trained."""
    trajectory = rollout.trajectory
    g = torch.Generator().manual_seed(seed)
    (j,) = torch.randperm(trajectory.steps, generator=g)[:1].tolist()
    x0 = trajectory.latents[rows, -1]
    noise = torch.randn(x0.shape, generator=g)
    sigma = trajectory.sigmas[j]
    x_t = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        v = worker.generator.velocity(x_t, trajectory.timesteps[j], rollout.conditioning.rows(rows))
    return float(((x_t - sigma * v - x0) ** 2).mean())


def test_a_high_advantage_pulls_toward_its_sample_and_a_low_one_pushes_away(cache_dir: Path, tmp_path: Path) -> None:
    settings = _settings("gen", cache_dir, tmp_path, timestep_fraction=0.34, kl_beta=0.0, learning_rate=1e-3)
    worker = fixed_reward_worker(settings)
    (rollout,) = worker.sample_groups([next(worker.conditions)], Timings())
    start = [p.detach().clone() for p in worker.params]
    moved = {}
    for advantage in (5.0, -5.0):
        with torch.no_grad():
            for p, value in zip(worker.params, start, strict=True):
                p.copy_(value)
        worker.optimizer = torch.optim.SGD(worker.params, lr=settings.learning_rate)
        rollout.advantages = GroupAdvantages(torch.tensor([advantage, 0, 0, 0]), torch.tensor([1, 0, 0, 0]) > 0, False)
        before = _x0_error(worker, rollout, 7, slice(0, 1))
        worker.algorithm.rng.manual_seed(7)
        assert worker.update([rollout]).samples == 1
        moved[advantage] = _x0_error(worker, rollout, 7, slice(0, 1)) - before
    assert moved[5.0] < 0 < moved[-5.0]


def test_repeated_steps_on_a_fixed_batch_lower_the_policy_loss(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(_settings("gen", cache_dir, tmp_path, kl_beta=0.0, learning_rate=3e-3))
    rollouts = worker.sample_groups([next(worker.conditions)], Timings())
    losses = []
    for _ in range(4):
        worker.algorithm.rng.manual_seed(3)  # the same noise and timesteps every time: a fixed objective
        stats = worker.update(rollouts)
        assert isinstance(stats, NFTStats) and stats.samples == G
        losses.append(stats.policy_loss / stats.terms)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def _gradients(worker: RolloutWorker, rollouts: list) -> list[torch.Tensor]:
    (rows,) = worker._mini_batches(rollouts)
    worker.optimizer.zero_grad(set_to_none=True)
    worker.algorithm.rng.manual_seed(11)
    stats = worker.algorithm.new_stats()
    worker.algorithm.accumulate(worker.settings, rollouts, rows, stats, norm=1.0)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in worker.params]


def test_masked_samples_change_no_gradient(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(_settings("gen", cache_dir, tmp_path, kl_beta=1.0), [0.0, None, 0.5, 1.0])
    (rollout,) = worker.sample_groups([next(worker.conditions)], Timings())
    assert rollout.advantages is not None and rollout.advantages.mask.tolist() == [True, False, True, True]
    with torch.no_grad():  # a trained adapter away from the old one and the reference: no gradient is trivially 0
        for p in worker.params:
            p.add_(0.05)
    base = _gradients(worker, [rollout])
    assert any(float(g.abs().sum()) > 0 for g in base)
    rollout.trajectory.latents[1] += 3.0 * torch.randn_like(rollout.trajectory.latents[1])  # the unscored sample
    rollout.advantages.advantages[1] = 100.0
    assert all(torch.equal(a, b) for a, b in zip(base, _gradients(worker, [rollout]), strict=True))
    rollout.trajectory.latents[2] += 3.0 * torch.randn_like(rollout.trajectory.latents[2])  # a scored one does count
    assert any(not torch.equal(a, b) for a, b in zip(base, _gradients(worker, [rollout]), strict=True))


def test_tied_groups_train_with_advantage_zero(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(_settings("gen", cache_dir, tmp_path), [0.5, 0.5, 0.5, None])
    result = worker.step()
    assert result.figures["groups/zero_spread"] == 1 and result.update.samples == 3  # the unscored one never trains
    grpo = fixed_reward_worker(_settings("gen", cache_dir, tmp_path, algorithm="grpo"), [0.5, 0.5, 0.5, None])
    assert grpo.step().update.samples == 0


def test_the_old_adapter_samples_and_follows_the_schedule(cache_dir: Path, tmp_path: Path) -> None:
    assert [old_decay(n, 1) for n in (0, 1, 250, 500, 10_000)] == [0.0, 0.001, 0.25, 0.5, 0.5]
    assert [old_decay(n, 2) for n in (0, 74, 75, 175, 10_000)] == [0.0, 0.0, 0.0, 0.75, 0.999]
    assert [old_decay(n, 0) for n in (0, 10_000)] == [0.0, 0.0]
    worker = fixed_reward_worker(_settings("gen", cache_dir, tmp_path, learning_rate=0.05))
    nft = worker.algorithm
    assert all(torch.equal(o, p) for o, p in zip(nft.old.weights, worker.params, strict=True))  # starts as trained
    worker.step()  # one optimizer step: d = 0.001, so the old adapter nearly caught up
    old = [w.clone() for w in nft.old.weights]
    trained = [p.detach().clone() for p in worker.params]
    assert any(not torch.equal(o, t) for o, t in zip(old, trained, strict=True))
    figures = nft.after_step(worker.settings, 300)  # as after 300 optimizer steps: d = 0.3
    for o, t, now in zip(old, trained, nft.old.weights, strict=True):
        assert torch.allclose(now, 0.3 * o + 0.7 * t)
    assert figures["train/old_decay"] == pytest.approx(0.3) and figures["train/old_adapter_distance"] > 0
    # the groups are sampled by the old adapter, not the trained one
    conditioning, latents = worker.generator.prepare(next(worker.conditions), 2, torch.Generator().manual_seed(0))
    sampled = nft.sample(worker.settings, conditioning, latents, torch.Generator())
    with nft.old.applied(worker.params):
        by_old = sample_dpm2(worker.generator, conditioning, latents, steps=3)
    by_trained = sample_dpm2(worker.generator, conditioning, latents, steps=3)
    assert torch.equal(sampled.latents, by_old.latents) and not torch.equal(sampled.latents, by_trained.latents)
    assert all(torch.equal(p, t) for p, t in zip(worker.params, trained, strict=True))  # swapped back


def test_the_ema_differs_from_the_trained_weights_and_is_what_reloads(cache_dir: Path, tmp_path: Path) -> None:
    settings = _settings("gen", cache_dir, tmp_path, learning_rate=0.05, lora_rank=4, lora_alpha=8, eval_steps=2)
    assert fixed_reward_worker(_settings("gen", cache_dir, tmp_path, algorithm="grpo")).ema is None  # off for GRPO
    worker = fixed_reward_worker(settings)
    for _ in range(2):
        worker.step()
    assert worker.ema is not None
    assert any(not torch.allclose(e, p) for e, p in zip(worker.ema.weights, worker.params, strict=True))
    (rollout,) = worker.sample_groups([next(worker.conditions)], Timings())
    x, t = rollout.trajectory.latents[:, 1], rollout.trajectory.timesteps[1]
    with torch.no_grad():
        trained = worker.generator.velocity(x, t, rollout.conditioning)
        with worker.ema.applied(worker.params):
            averaged = worker.generator.velocity(x, t, rollout.conditioning)
    worker.save(2)
    fresh = load_generator(settings, CPU)
    with torch.no_grad():
        fresh.pipeline.load_lora_weights(str(settings.output_dir / "checkpoint-2"))
        reloaded = fresh.velocity(x, t, rollout.conditioning)
    assert not torch.allclose(trained, averaged, atol=1e-5)
    assert torch.allclose(reloaded, averaged, atol=1e-5)
    assert worker.evaluate() == pytest.approx(0.4375)  # the mean fixed reward, sampled with the EMA
    assert torch.equal(worker.generator.velocity(x, t, rollout.conditioning).detach(), trained)  # swapped back


@pytest.mark.parametrize("task", ["gen", "edit"])
def test_one_nft_step_against_the_server(task: str, server_url: str, cache_dir: Path, tmp_path: Path) -> None:
    settings = _settings(task, cache_dir, tmp_path, score_mode="expected", learning_rate=0.05)
    critic = RemoteCritic(task, server_url, score_mode="expected")
    try:
        source = picture("blue") if task == "edit" else None
        conditions = [Condition("Make the square red." if source else "a red square", source, id="c")]
        generator = load_generator(settings, CPU)
        worker = RolloutWorker(settings, generator, critic, endless(conditions, 0))
        lora_b = [p for name, p in generator.transformer.named_parameters() if "lora_B" in name]
        result = worker.step()
    finally:
        critic.close()
    (rollout,) = result.rollouts
    assert rollout.rewards is not None and rollout.rewards.failed == 0
    assert rollout.trajectory.latents.shape[:2] == (G, 4) and not rollout.trajectory.log_probs.any()
    assert result.update.samples == G and result.update.optimizer_steps == 1
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # only a gradient moves B from zero
    figures = result.figures
    for name in ("loss", "policy_loss", "positive_loss", "negative_loss", "kl", "old_deviation", "grad_norm"):
        assert math.isfinite(figures[f"train/{name}"]), name
    assert figures["train/old_decay"] == pytest.approx(0.001) and figures["train/old_adapter_distance"] > 0
    assert figures["groups/total"] == 1 and figures["reward/scored"] == G


def test_torchrun_nft_workers_log_figures_of_both_ranks(server_url: str, cache_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square on a grey background\na blue square on a grey background\n")
    out = tmp_path / "ddp"
    line = torchrun_gen_step(server_url, cache_dir, prompts, out, group_size=G, flags=("--algorithm", "nft"))
    # every sample of both ranks' groups was scored and trained (NFT trains tied groups too)
    assert line["groups/total"] == 2 and line["reward/scored"] == 2 * G and line["train/samples"] == 2 * G
    for name in ("positive_loss", "negative_loss", "kl", "old_deviation", "old_adapter_distance"):
        assert line[f"train/{name}"] is not None, name
    settings = json.loads((out / "checkpoint-1" / "firm_rollout.json").read_text())["settings"]
    assert (settings["algorithm"], settings["ema_decay"], settings["guidance_scale"]) == ("nft", 0.9, 1.0)
