"""Flow-GRPO's math as the default and each alternative as a setting, on tiny pipelines, no server.

Each test shows that a setting changes what it says it changes: which steps train, the KL's scale,
which CFG branch carries gradient, how advantages are scaled and clipped, the dtype of the stored
trajectory, and how Qwen-Image-Edit's source image conditions the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clients.tasks import TASKS
from foundation.flags import parse_settings
from rl_workers import grpo
from rl_workers.advantages import group_advantages, step_advantages
from rl_workers.cli import build_parser
from rl_workers.distributed import Ranks
from rl_workers.generators.base import Condition, Generator
from rl_workers.generators.qwen_edit import edit_size
from rl_workers.observability import MetricsLog
from rl_workers.sampling import kl_to_reference, sample, sde_step, sigma_cap_of
from rl_workers.settings import RolloutSettings
from rl_workers.tasks import ROLLOUT_TASKS
from rl_workers.tiny import ensure_tiny_pipeline
from rl_workers.worker import Timings
from tests.fixed_rewards import fixed_reward_worker
from tests.support import picture

G = 4
CPU = torch.device("cpu")


def settings_for(task: str, cache_dir: Path, tmp_path: Path, **extra: Any) -> RolloutSettings:
    ensure_tiny_pipeline(cache_dir, ROLLOUT_TASKS[task].generator)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    fields: dict[str, Any] = {
        "resolution": 64, "group_size": G, "sample_steps": 3, "max_sequence_length": 16, "source_vae_side": 64,
        "source_vl_side": 64, "progress": False, "tensorboard": False, "groups_per_step": 1, "updates_per_step": 1,
    }  # fmt: skip
    return RolloutSettings(
        task=task, tiny=True, cache_dir=cache_dir, prompts=prompts, output_dir=tmp_path / "out", **(fields | extra)
    )


def test_timestep_fraction_trains_the_first_int_fraction_steps(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = grpo.step_log_prob

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[4])
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, "step_log_prob", spy)
    worker = fixed_reward_worker(settings_for("gen", cache_dir, tmp_path, kl_beta=0.0, group_size=2), [0.0, 1.0])
    for fraction, trained in ((0.99, [0, 1]), (1.0, [0, 1, 2]), (0.34, [0])):
        worker.settings = worker.settings.model_copy(update={"timestep_fraction": fraction})
        seen.clear()
        worker.step()
        assert sorted(set(seen)) == trained, fraction
    assert RolloutSettings.model_fields["timestep_fraction"].default == 0.99  # the last step never trains


def test_kl_form_scales_each_step_by_its_size(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for("gen", cache_dir, tmp_path))
    sigmas, _ = worker.generator.schedule(10, torch.zeros(1, 4, 8, 8))
    x, v, ref_v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ratios = []
    for i in range(10):
        step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level=0.7, sigma_cap=sigma_cap_of(sigmas), generator=None)
        ref = sde_step(x, ref_v, sigmas[i], sigmas[i + 1], noise_level=0.7, sigma_cap=sigma_cap_of(sigmas),
                       next_latents=step.next_latents)  # fmt: skip
        exact, flow = kl_to_reference(step, ref, "exact"), kl_to_reference(step, ref, "flow_grpo")
        dt = sigmas[i] - sigmas[i + 1]
        assert torch.allclose(flow, exact * dt, rtol=1e-5)  # flow_grpo = |dt| * the exact Gaussian KL
        ratios.append(float((exact / flow).mean()))
    assert min(ratios) > 1 and max(ratios) > 2 * min(ratios)  # the exact form weighs small steps the most
    assert RolloutSettings.model_fields["kl_form"].default == "flow_grpo"


def _velocity_gradients(generator: Generator, conditioning: Any, latents: torch.Tensor, params: list) -> list:
    for p in params:
        p.grad = None
    generator.velocity(latents, 500.0, conditioning).sum().backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("task", ["gen", "edit"])
def test_cfg_grad_cond_detaches_the_unconditional_branch(task: str, cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for(task, cache_dir, tmp_path))
    generator, params = worker.generator, worker.params
    with torch.no_grad():
        for p in params:
            p.add_(0.05)  # B != 0: LoRA acts on both branches
    condition = next(worker.conditions)
    conditioning, latents = generator.prepare(condition, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        value = generator.velocity(latents, 500.0, conditioning)
    generator.cfg_grad = "cond"
    cond_only = _velocity_gradients(generator, conditioning, latents, params)
    generator.cfg_grad = "both"
    both = _velocity_gradients(generator, conditioning, latents, params)
    assert any(not torch.allclose(a, b) for a, b in zip(cond_only, both, strict=True))
    with torch.no_grad():  # the same value either way: only the gradient's path changes
        assert torch.allclose(generator.velocity(latents, 500.0, conditioning), value, atol=1e-5)
    if task == "gen":  # linear CFG: d/dθ Σ(u + s(c - u)) with u detached is s · d/dθ Σc
        scale = generator.guidance_scale
        generator.guidance_scale = 1.0
        unguided = _velocity_gradients(generator, conditioning, latents, params)
        assert all(torch.allclose(a, scale * b, rtol=1e-4, atol=1e-6) for a, b in zip(cond_only, unguided, strict=True))


def test_adv_std_global_divides_by_the_std_of_the_whole_step() -> None:
    narrow, wide = [0.4, 0.6], [0.0, 1.0]
    by_group = step_advantages([narrow, wide], std_floor=0.01, adv_std="group", clip=5.0, ranks=Ranks(), device=CPU)
    assert [a.advantages.tolist() for a in by_group] == [[-1.0, 1.0], [-1.0, 1.0]]
    by_step = step_advantages([narrow, wide], std_floor=0.01, adv_std="global", clip=5.0, ranks=Ranks(), device=CPU)
    std = float(torch.tensor(narrow + wide).std(unbiased=False))
    assert by_step[0].advantages.tolist() == pytest.approx([-0.1 / std, 0.1 / std], rel=1e-5)
    assert by_step[1].advantages.tolist() == pytest.approx([-0.5 / std, 0.5 / std], rel=1e-5)
    assert RolloutSettings.model_fields["adv_std"].default == "global"  # Flow-GRPO's global_std


def test_adv_clip_bounds_an_outlier() -> None:
    rewards = [0.0] * 36 + [1.0]  # the lone success is sqrt(36) = 6 group stds above the mean
    assert float(group_advantages(rewards, clip=10.0).advantages.max()) == pytest.approx(6.0)
    assert float(group_advantages(rewards).advantages.max()) == pytest.approx(5.0)  # the default clip
    assert float(group_advantages(rewards, clip=2.0).advantages.max()) == pytest.approx(2.0)


def test_trajectory_latents_are_float32_and_the_model_gets_its_dtype(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for("gen", cache_dir, tmp_path))
    generator = worker.generator
    generator.transformer.to(torch.bfloat16)
    generator.dtype = torch.bfloat16
    inputs: list[torch.dtype] = []
    generator.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"].dtype),
                                                    with_kwargs=True)  # fmt: skip
    conditioning, latents = generator.prepare(next(worker.conditions), G, torch.Generator().manual_seed(0))
    conditioning.tensors = {k: v.to(torch.bfloat16) for k, v in conditioning.tensors.items()}
    trajectory = sample(generator, conditioning, latents, steps=3, noise_level=0.7, generator=torch.Generator())
    assert trajectory.latents.dtype == torch.float32 and set(inputs) == {torch.bfloat16}
    last = trajectory.latents[:, -1]
    assert not torch.equal(last, last.to(torch.bfloat16).float())  # rounding would have changed the stored step


def test_gradient_checkpointing_is_a_setting_that_keeps_the_gradients(cache_dir: Path, tmp_path: Path) -> None:
    grads = {}
    for on in (False, True):
        worker = fixed_reward_worker(settings_for("gen", cache_dir, tmp_path, gradient_checkpointing=on))
        assert worker.generator.transformer.is_gradient_checkpointing is on
        with torch.no_grad():
            for p in worker.params:
                p.add_(0.05)
        conditioning, latents = worker.generator.prepare(next(worker.conditions), 2, torch.Generator().manual_seed(0))
        grads[on] = _velocity_gradients(worker.generator, conditioning, latents, worker.params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True], strict=True))


def test_default_train_batch_and_source_sizes_are_per_model(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    real, tiny = RolloutSettings(task="edit", prompts=prompts), RolloutSettings(task="edit", prompts=prompts, tiny=True)
    assert (real.vae_side, real.vl_side, tiny.vae_side, tiny.vl_side) == (1024, 384, 512, 512)
    assert RolloutSettings(task="edit", prompts=prompts).batch_size == 1
    assert RolloutSettings(task="gen", prompts=prompts).batch_size == 4
    assert RolloutSettings(task="edit", prompts=prompts, train_batch_size=2).batch_size == 2
    gen, edit = RolloutSettings(task="gen", prompts=prompts), RolloutSettings(task="edit", prompts=prompts)
    assert (gen.model_id, gen.guidance) == ("stabilityai/stable-diffusion-3.5-medium", 4.5)
    assert (edit.model_id, edit.guidance) == ("Qwen/Qwen-Image-Edit", 4.0)


def test_every_critic_task_has_a_rollout_entry_and_the_critics_names() -> None:
    assert set(ROLLOUT_TASKS) == set(TASKS)
    assert RolloutSettings.model_fields["task"].default == "gen"
    for name, entry in ROLLOUT_TASKS.items():
        assert entry.spec is TASKS[name]  # the critic's task, not a copy of its facts


def test_the_former_task_name_t2i_still_works_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.txt"
    with pytest.warns(FutureWarning, match="'t2i' is now called 'gen'"):
        assert RolloutSettings(task="t2i", prompts=prompts).task == "gen"
    monkeypatch.setenv("FIRM_RL_TASK", "t2i")
    with pytest.warns(FutureWarning, match="'t2i' is now called 'gen'"):
        assert RolloutSettings(prompts=prompts).task == "gen"
    monkeypatch.delenv("FIRM_RL_TASK")
    parser = build_parser()
    with pytest.warns(FutureWarning, match="'t2i' is now called 'gen'"):
        settings = parse_settings(parser, RolloutSettings, ["--task", "t2i", "--prompts", str(prompts)])
    assert settings.task == "gen" and settings.batch_size == 4
    assert "--task {edit,gen}" in parser.format_help()  # the help offers the current names only
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "bogus"])
    assert "invalid choice: 'bogus' (choose from 'edit', 'gen')" in capsys.readouterr().err


def test_prompts_are_embedded_once(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for("edit", cache_dir, tmp_path, prompt_cache=1))
    generator = worker.generator
    condition = next(worker.conditions)
    first, _ = generator.prepare(condition, 2, torch.Generator().manual_seed(0))
    again, _ = generator.prepare(condition, 3, torch.Generator().manual_seed(0))
    assert generator.prompts.embedded == 1  # type: ignore[attr-defined]
    assert torch.equal(first.tensors["embeds"][0], again.tensors["embeds"][2])
    other = Condition("Paint the square yellow.", picture("green"), id="d")
    generator.prepare(other, 2, torch.Generator())
    generator.prepare(condition, 2, torch.Generator())  # pushed out of a one-entry cache: embedded again
    assert generator.prompts.embedded == 3  # type: ignore[attr-defined]


def test_the_same_instruction_on_another_source_is_embedded_anew(cache_dir: Path, tmp_path: Path) -> None:
    """Qwen's encoder sees the source image, so a cached embedding is never reused for another image,
    even under the same id and instruction."""
    generator = fixed_reward_worker(settings_for("edit", cache_dir, tmp_path)).generator
    red, blue = Condition("Make it green.", picture("red")), Condition("Make it green.", picture("blue"))
    first, _ = generator.prepare(red, 1, torch.Generator())
    second, _ = generator.prepare(blue, 1, torch.Generator())
    assert generator.prompts.embedded == 2  # type: ignore[attr-defined]
    assert not torch.equal(first.tensors["embeds"], second.tensors["embeds"])


def test_qwen_edit_source_is_vae_encoded_and_seen_at_their_own_sizes(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for("edit", cache_dir, tmp_path, source_vae_side=128, source_vl_side=32))
    generator = worker.generator
    seen: list[tuple[int, int]] = []
    encode = generator.pipeline.encode_prompt

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["image"][0].size)
        return encode(*args, **kwargs)

    generator.pipeline.encode_prompt = spy
    source = picture("blue").resize((192, 128))
    conditioning, latents = generator.prepare(Condition("Make it red.", source, id="w"), 2, torch.Generator())
    assert set(seen) == {edit_size(192, 128, 32 * 32)}  # the vision-language encoder: about 32²
    vae_w, vae_h = edit_size(192, 128, 128 * 128)
    out_w, out_h = edit_size(192, 128, 64 * 64)
    f = generator.pipeline.vae_scale_factor * 2  # pixels per packed latent token
    assert conditioning.group["img_shapes"] == [(1, out_h // f, out_w // f), (1, vae_h // f, vae_w // f)]
    assert conditioning.tensors["image_latents"].shape[1] == (vae_h // f) * (vae_w // f)
    assert latents.shape[1] == (out_h // f) * (out_w // f)
    assert conditioning.group["source"].size == (out_w, out_h)  # the critic compares against the output's size
    trajectory = sample(generator, conditioning, latents, steps=2, noise_level=0.7, generator=torch.Generator())
    assert trajectory.latents.shape[2] == latents.shape[1]


def test_metrics_write_null_for_an_unknown_figure(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False, wandb_project=None, config={})
    log.write(1, {"reward/mean": math.nan, "train/loss": math.inf, "reward/failed_fraction": 1.0})
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "reward/mean": None, "train/loss": None, "reward/failed_fraction": 1.0}


def test_rl_memory_bench_prints_each_phase(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.rl_memory import main

    ensure_tiny_pipeline(cache_dir, "qwen_edit")
    main(["--tiny", "--task", "edit", "--device", "cpu", "--cache-dir", str(cache_dir), "--group-size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["load", "sampling", "scoring", "update"]
    assert all("GiB" in line for line in lines[2:6]) and "train batch=1" in lines[1]
    assert lines[-1] == "trained 2 samples in 1 optimizer step(s)"


def test_text_encoders_are_on_the_gpu_only_while_they_embed() -> None:
    from rl_workers.generators.prompt_cache import PromptCache

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.place = "loaded"

        def to(self, device: Any) -> Encoder:  # type: ignore[override]
            self.place = str(device)
            return self

    encoder = Encoder()
    cache = PromptCache([encoder], torch.device("cuda"), size=4, offload=True)
    assert encoder.place == "cpu"  # offloaded as soon as the generator is built
    during: list[str] = []
    for _ in range(2):
        cache.get("a prompt", lambda: during.append(encoder.place) or {"embeds": None})
    assert during == ["cuda"] and encoder.place == "cpu" and cache.embedded == 1  # moved once, for the miss
    kept = PromptCache([Encoder()], torch.device("cuda"), size=4, offload=False)
    assert kept.encoders[0].place == "loaded"  # type: ignore[attr-defined]


def test_decode_batch_bounds_how_many_images_decode_at_once(cache_dir: Path, tmp_path: Path) -> None:
    worker = fixed_reward_worker(settings_for("gen", cache_dir, tmp_path, decode_batch=3))
    generator, sizes = worker.generator, []
    decode = generator.decode
    generator.decode = lambda latents, c: sizes.append(len(latents)) or decode(latents, c)  # type: ignore[method-assign]
    (rollout,) = worker.sample_groups([next(worker.conditions)], Timings())
    assert sizes == [3, 1]
    whole = decode(rollout.trajectory.latents[:, -1], rollout.conditioning)  # the same images as one batch
    submitted = worker.critic.images  # type: ignore[attr-defined]
    for a, b in zip(submitted, whole, strict=True):  # equal up to rounding: batch size changes kernel order
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2
