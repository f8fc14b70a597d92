"""The "Plug into your trainer" blocks of docs/rl.md, run the way each trainer runs them, against a live
firm-serve on the tiny critic, with one item in a prompt group that the server cannot score.

The trainers' own code is not a dependency here, except TRL, which runs for real. Where a test
reproduces a trainer's calling code or advantage arithmetic, it says which file and lines it
follows: the FIRM release (VisionXLab/FIRM-Reward at ba4149389e8902b91817fbccce90a4e3cf9f7605),
Flow-GRPO (yifan123/flow_grpo at ac4c86e) and verl (volcengine/verl at b178a3cd5).
"""

from __future__ import annotations

import io
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tests.support import picture

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "rl.md"
INSTRUCTION = "Make the square red."
TIMESTEPS = 3  # denoising steps the trainers repeat `avg` over
TOO_LONG = "x" * 5000  # over the protocol's 4,000-character requirement: the server refuses that request


def trainer_block(name: str) -> str:
    """The fenced block that follows `<!-- trainer-block: NAME -->` in docs/rl.md."""
    text = GUIDE.read_text()
    match = re.search(rf"<!-- trainer-block: {re.escape(name)} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"docs/rl.md has no trainer block {name!r}"
    return match.group(1)


def broken_png() -> bytes:
    buffer = io.BytesIO()
    picture("red").save(buffer, format="PNG")
    return buffer.getvalue()[:60]


def nchw(*colours: str) -> torch.Tensor:
    """What the samplers hand the reward function: an NCHW float batch in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(picture(c))).permute(2, 0, 1).float() / 255 for c in colours])


def per_prompt_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """Per-prompt advantages as the trainers' PerPromptStatTracker.update computes them (global_std off):
    for each distinct prompt, (reward - mean of that prompt's rewards) / (their std + 1e-4), in float64.
    Follows FIRM-Reward generation/flow_grpo/stat_tracking.py lines 12-32, editing/flow_grpo/stat_tracking.py
    lines 17-57 and flow_grpo/stat_tracking.py lines 11-31 (the 'grpo' branch)."""
    keys = np.array(prompts)
    values = np.asarray(rewards, dtype=np.float64)
    advantages = np.zeros_like(values)
    for key in np.unique(keys):
        group = values[keys == key]
        advantages[keys == key] = (group - group.mean(axis=0)) / (group.std(axis=0) + 1e-4)
    return advantages


def as_trainer_tensors(rewards: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every value through `torch.as_tensor(value, device=...).float()`, as all three trainers do
    (train_nft_sd3.py lines 751 and 762, train_nft_qwen_image_edit.py lines 845-847, train_sd3.py lines 692-696)."""
    return {key: torch.as_tensor(value, device="cpu").float() for key, value in rewards.items()}


def closing(reward_fn: Any) -> None:
    reward_fn.client.close()


@pytest.fixture
def firm_env(server_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The trainer blocks build their client from FIRM_URL; one item per request, so a refused request
    fails one item."""
    monkeypatch.setenv("FIRM_URL", server_url)
    monkeypatch.setenv("FIRM_CHUNK_SIZE", "1")
    yield


def swapped_factory(block: str) -> SimpleNamespace:
    """Run a trainer block that swaps `flow_grpo.rewards.multi_score`, as it runs inside a trainer script
    right after `import flow_grpo.rewards`; the trainer's own module is a stand-in with its own factory."""
    rewards = ModuleType("flow_grpo.rewards")
    rewards.multi_score = lambda device, score_dict, **options: pytest.fail("the trainer's own scorers were built")
    flow_grpo = SimpleNamespace(rewards=rewards)
    exec(block, {"flow_grpo": flow_grpo})
    return flow_grpo


def test_release_editing_script_gets_finite_advantages_with_a_failed_item(firm_env: None) -> None:
    flow_grpo = swapped_factory(trainer_block("release"))
    # editing/config/qwen_image_edit_nft.py sets the total score on by default; the docs config block follows.
    config = SimpleNamespace(reward_fn={"mllm_score_execution": 0.6}, mllm_use_total_score=True)
    exec(trainer_block("release-config"), {"config": config})
    # train_nft_qwen_image_edit.py lines 602-622: the factory, called with the release's options.
    reward_fn = flow_grpo.rewards.multi_score(
        "cpu",
        config.reward_fn,
        normalize_mllm_score=True,
        normalize_mllm_score_mode="div5",
        normalize_mllm_score_range=(0.0, 1.0),
        exec_consistency_guard=False,
        use_total_score=config.mllm_use_total_score,
        total_score_w1=0.6,
        total_score_w2=0.4,
        total_score_mode="exec_consistency",
    )
    try:
        images = nchw("red", "red", "blue", "red")  # the last source below cannot be decoded
        ref_images: list[Any] = [picture("blue")] * 3 + [broken_png()]
        prompts = [INSTRUCTION] * 4
        metadata = [{"prompt": INSTRUCTION, "image": "images/0001.png"}] * 4  # a dataset-relative path
        # lines 810-817: submitted to the reward thread pool with ref_images and only_strict.
        with ThreadPoolExecutor(max_workers=8) as executor:
            rewards, extra = executor.submit(
                reward_fn, images, prompts, metadata, ref_images, only_strict=True
            ).result()
        ((index, reason),) = extra["errors"]  # the second element: this call's failures
        assert index == 3 and "invalid_image" in reason
        tensors = as_trainer_tensors(rewards)
        assert tensors["failed"].tolist() == [0.0, 0.0, 0.0, 1.0]
        assert tensors["firm_edit"][:3].tolist() == pytest.approx([0.9, 0.9, 0.0])
        # lines 896-900 repeat avg along the timesteps; lines 930-932 take per-prompt advantages.
        avg = tensors["avg"].unsqueeze(1).repeat(1, TIMESTEPS).numpy()
        advantages = per_prompt_advantages(prompts, avg)
        assert np.isfinite(advantages).all()
        assert advantages[3] == pytest.approx(np.zeros(TIMESTEPS), abs=1e-5)  # the failed item teaches nothing
        assert (advantages[:2] > 0).all() and (advantages[2] < 0).all()
    finally:
        closing(reward_fn)


def two_rank_step(reward_fn: Any, ranks: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One sampling step of the release's NFT scripts on two ranks: each rank's reward call submitted to the
    8-thread pool (train_nft_sd3.py lines 565 and 733; train_nft_qwen_image_edit.py lines 573 and 810-817),
    every value through torch (line 762 / 845-847), `avg` repeated over the timesteps (801-802 / 896-900)
    and gathered in rank order (806-808 / 903-907). Returns the gathered prompts, `avg` and `failed`."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        futures = [
            executor.submit(reward_fn, r["images"], r["prompts"], r["metadata"], *r.get("ref", ()), only_strict=True)
            for r in ranks
        ]
        calls = [future.result() for future in futures]
    tensors = [as_trainer_tensors(rewards) for rewards, _ in calls]
    avg = np.concatenate([t["avg"].unsqueeze(1).repeat(1, TIMESTEPS).numpy() for t in tensors])
    failed = np.concatenate([t["failed"].numpy() for t in tensors]).astype(bool)
    return [p for r in ranks for p in r["prompts"]], avg, failed


def split_groups(colours: list[str], text: dict[str, str]) -> list[dict[str, Any]]:
    """2 prompts x 4 samples dealt over 2 ranks as the release's DistributedKRepeatSampler deals them
    (train_nft_sd3.py lines 154-186: each group's samples shuffled over all ranks): rank 0 holds three
    of prompt A and one of B, rank 1 the rest. `text` maps A and B to the prompts."""
    keys = [["A", "A", "A", "B"], ["B", "B", "B", "A"]]
    return [
        {"prompts": [text[k] for k in rank], "images": nchw(*colours[4 * i : 4 * i + 4]), "metadata": [{}] * 4}
        for i, rank in enumerate(keys)
    ]


def assert_left_out(advantages: np.ndarray, prompts: list[str], avg: np.ndarray, failed: np.ndarray) -> None:
    """The failed item's advantage is 0; every other one is the release's formula on the scored items alone."""
    assert (advantages[failed] == 0).all()
    scored = ~failed
    expected = per_prompt_advantages([p for p, keep in zip(prompts, scored, strict=True) if keep], avg[scored])
    np.testing.assert_array_equal(advantages[scored], expected)


def test_release_multi_gpu_block_keeps_a_failed_item_out_of_its_split_group(firm_env: None) -> None:
    ranks = split_groups(
        ["red", "blue", "blue", "yellow", "yellow", "yellow", "blue", "red"],
        {"A": "a red square", "B": "a yellow square"},
    )
    ranks[0]["metadata"] = [{}, {}, {}, {"requirement": TOO_LONG}]  # rank 0's only yellow-square item fails
    scope: dict[str, Any] = {"flow_grpo": swapped_factory(trainer_block("release"))}
    default_fn = scope["flow_grpo"].rewards.multi_score("cpu", {"firm_gen": 1.0})
    exec(trainer_block("release-multi-gpu"), scope)
    reward_fn = scope["flow_grpo"].rewards.multi_score("cpu", {"firm_gen": 1.0})  # train_nft_sd3.py line 589
    try:
        prompts, avg, failed = two_rank_step(reward_fn, ranks)
        assert failed.tolist() == [False] * 3 + [True] + [False] * 4 and np.isnan(avg[failed]).all()
        tracker = scope["PerPromptStatTracker"](False)  # line 556: PerPromptStatTracker(config.sample.global_std)
        advantages = tracker.update(prompts, avg)  # line 835
        assert_left_out(advantages, prompts, avg, failed)
        assert tracker.get_stats() == (3.5, 2)  # group sizes count scored items
        # The single-GPU default on the same step: the stand-in comes from the other prompt's items in its call,
        # and the release's tracker counts it as a reward.
        _, filled, _ = two_rank_step(default_fn, ranks)
        released = per_prompt_advantages(prompts, filled)
        assert abs(released[3, 0]) > 0.1  # the failed item teaches
        assert not np.allclose(released[4:7], advantages[4:7])  # and its groupmates on rank 1 moved
    finally:
        closing(reward_fn)
        closing(default_fn)


def test_release_multi_gpu_edit_block_with_the_banning_tracker(firm_env: None) -> None:
    ranks = split_groups(
        ["red", "blue", "red", "orange", "orange", "blue", "orange", "red"],
        {"A": INSTRUCTION, "B": "Make the square orange."},
    )
    for i, rank in enumerate(ranks):
        sources: list[Any] = [picture("blue")] * 4
        if i == 1:
            sources[0] = broken_png()  # rank 1's first orange item cannot be scored
        rank["ref"] = (sources,)
    scope: dict[str, Any] = {"flow_grpo": swapped_factory(trainer_block("release"))}
    exec(trainer_block("release-multi-gpu-edit"), scope)
    reward_fn = scope["flow_grpo"].rewards.multi_score("cpu", {"firm_edit": 1.0}, use_total_score=False)
    try:
        prompts, avg, failed = two_rank_step(reward_fn, ranks)
        assert failed.tolist() == [False] * 4 + [True] + [False] * 3
        # train_nft_qwen_image_edit.py lines 565-569 build it; lines 930-932 unpack three arrays.
        tracker = scope["PerPromptStatTracker"](False, 0.05, 0.9)
        advantages, stds, means = tracker.update(prompts, avg)
        assert_left_out(advantages, prompts, avg, failed)
        assert stds.shape == means.shape == avg.shape and np.isfinite(stds).all() and np.isfinite(means).all()
        assert not tracker.banned_prompts  # both groups have spread
    finally:
        closing(reward_fn)


def nft_weights(advantages: np.ndarray, clip_max: float = 5.0) -> np.ndarray:
    """The NFT loss's use of advantages: clipped to [-clip_max, clip_max], mapped to r in [0, 1]
    (train_nft_sd3.py lines 995-1014, adv_mode 'all')."""
    return np.clip(np.clip(advantages, -clip_max, clip_max) / clip_max / 2.0 + 0.5, 0.0, 1.0)


def test_release_text_to_image_script_and_the_nan_setting(firm_env: None) -> None:
    flow_grpo = swapped_factory(trainer_block("release"))
    prompts = ["a red square"] * 4 + ["a blue square"] * 4
    metadata: list[dict[str, Any]] = [{}] * 8
    metadata[5] = {"requirement": TOO_LONG}  # that item's request is refused: its reward is missing
    images = nchw("red", "blue", "red", "blue", "blue", "red", "blue", "red")
    fns = {
        setting: flow_grpo.rewards.multi_score("cpu", {"firm_gen": 1.0}, on_failure=setting)
        for setting in ("group_mean", "nan")
    }
    try:
        advantages = {}
        for setting, reward_fn in fns.items():
            # train_nft_sd3.py line 733 submits the call; line 762 converts; lines 801-802 repeat avg.
            with ThreadPoolExecutor(max_workers=8) as executor:
                rewards, _ = executor.submit(reward_fn, images, prompts, metadata, only_strict=True).result()
            tensors = as_trainer_tensors(rewards)
            assert tensors["failed"].tolist() == [0.0] * 5 + [1.0] + [0.0] * 2
            avg = tensors["avg"].unsqueeze(1).repeat(1, TIMESTEPS).numpy()
            advantages[setting] = per_prompt_advantages(prompts, avg)  # line 835
        assert np.isfinite(advantages["group_mean"]).all()
        assert np.isfinite(nft_weights(advantages["group_mean"])).all()
        assert advantages["group_mean"][5] == pytest.approx(np.zeros(TIMESTEPS), abs=1e-5)
        assert np.isfinite(advantages["group_mean"][:4]).all()
        # Without a substitute the trainer has no mask: the failed item's whole group goes NaN.
        assert np.isnan(advantages["nan"][4:]).all() and np.isfinite(advantages["nan"][:4]).all()
    finally:
        for reward_fn in fns.values():
            closing(reward_fn)


def test_flow_grpo_script_two_sampling_batches_and_policy_loss(firm_env: None) -> None:
    flow_grpo = swapped_factory(trainer_block("flow-grpo"))
    config = SimpleNamespace(reward_fn={"pickscore": 1.0})
    exec(trainer_block("flow-grpo-config"), {"config": config})
    reward_fn = flow_grpo.rewards.multi_score("cpu", config.reward_fn)  # train_sd3.py line 474
    try:
        batches = [  # the K-repeat sampler spreads each prompt's images over several sampling batches
            (nchw("red", "blue", "red", "blue"), ["a red square"] * 2 + ["a blue square"] * 2, [{}] * 4),
            (nchw("red", "blue", "blue", "red"), ["a red square"] * 2 + ["a blue square"] * 2, [{}] * 4),
        ]
        batches[1][2][1] = {"requirement": TOO_LONG}  # one item of the second batch is refused
        samples = []
        with ThreadPoolExecutor(max_workers=8) as executor:
            futures = [executor.submit(reward_fn, im, pr, md, only_strict=True) for im, pr, md in batches]  # l. 663
            for future in futures:  # lines 688-696
                rewards, _ = future.result()
                samples.append(as_trainer_tensors(rewards))
        collated = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}  # lines 699-706
        prompts = [p for _, batch_prompts, _ in batches for p in batch_prompts]
        collated["ori_avg"] = collated["avg"]
        avg = collated["avg"].unsqueeze(1).repeat(1, TIMESTEPS).numpy()  # line 739
        advantages = torch.as_tensor(per_prompt_advantages(prompts, avg))  # line 761
        assert torch.isfinite(advantages).all()
        assert collated["failed"].tolist() == [0.0] * 5 + [1.0] + [0.0] * 2
        keep = advantages.abs().sum(dim=1) != 0  # line 797: samples with zero advantage are dropped
        ratio = torch.ones(int(keep.sum()))  # the first inner step: the policy has not moved
        kept = advantages[keep][:, 0]
        loss = torch.maximum(-kept * ratio, -kept * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)).mean()  # lines 881-890
        assert torch.isfinite(loss)
    finally:
        closing(reward_fn)


def test_verl_block_in_the_batch_and_per_item_call_forms(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRM_URL", server_url)
    monkeypatch.setenv("FIRM_CHUNK_SIZE", "1")
    command = trainer_block("verl-command")
    assert "reward_model.reward_manager=batch" in command and "custom_reward_function.name=compute_score" in command
    colours = iter(["red", "blue", "red", "red", "blue", "red"])
    module: dict[str, Any] = {"text_to_image": lambda response: picture(next(colours))}
    exec(trainer_block("verl"), module)  # verl loads firm_reward.py as a module
    raw_fn = module["compute_score"]
    try:
        # verl/trainer/ppo/reward.py lines 42-48: the config's reward_kwargs merged into the call.
        def compute_score(**kwargs: Any) -> Any:
            return raw_fn(**{**kwargs, "reward_kwargs_from_config": 1})

        prompts = ["a red square"] * 3 + ["a blue square"] * 3
        infos = [{"prompt": p, "rollout_reward_scores": {}} for p in prompts]
        infos[3]["requirement"] = TOO_LONG
        # verl/workers/reward_manager/batch.py lines 84-91 (the call) and 104-112 (reading the results).
        scores = compute_score(
            data_sources=["firm"] * 6,
            solution_strs=[f"picture {i}" for i in range(6)],
            ground_truths=[None] * 6,
            extra_infos=infos,
        )
        extra_info = defaultdict(list)
        rewards = []
        for score in scores:
            rewards.append(score["score"])
            for key, value in score.items():
                extra_info[key].append(value)
        assert {len(values) for values in extra_info.values()} == {6}
        assert extra_info["failed"] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        # verl/trainer/ppo/core_algos.py compute_grpo_outcome_advantage: per uid, (r - mean) / (std + 1e-6).
        uid = np.array(prompts)
        values = torch.tensor(rewards)
        advantages = torch.zeros_like(values)
        for key in np.unique(uid):
            members = torch.from_numpy(uid == key)
            advantages[members] = (values[members] - values[members].mean()) / (values[members].std() + 1e-6)
        assert torch.isfinite(advantages).all() and advantages[3] == pytest.approx(0.0, abs=1e-6)
        # verl/workers/reward_manager/naive.py lines 85-90: one item per call, which group_mean cannot serve.
        with pytest.raises(ValueError, match="reward_manager=batch"):
            compute_score(data_source="firm", solution_str="x", ground_truth=None, extra_info=infos[0])
    finally:
        closing(raw_fn)


def test_verl_per_item_call_with_a_number(server_url: str) -> None:
    from clients import RewardClient
    from clients.adapters.verl import make_compute_score

    with RewardClient(server_url) as client:
        compute_score = make_compute_score(client, "edit", on_failure=0.0)
        info = {"source": picture("blue"), "edited": picture("red"), "instruction": INSTRUCTION}
        result = compute_score(data_source="firm", solution_str="", ground_truth=None, extra_info=info)
        assert result["score"] == pytest.approx(0.9) and result["failed"] == 0.0
        failed = compute_score(
            data_source="firm", solution_str="", ground_truth=None, extra_info={**info, "source": broken_png()}
        )
        assert failed["score"] == 0.0 and failed["failed"] == 1.0 and set(failed) == set(result)


def _tiny_policy(folder: Path) -> Path:
    """A one-layer random Qwen2 causal LM and a locally trained tokenizer, saved as a checkpoint folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    from foundation.bpe import train_bpe

    vocab, merges = train_bpe(["a red square", "a blue square"] * 20, ["<|endoftext|>", "<|im_end|>"], 300)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_trl_block_trains_a_real_grpo_step_with_a_failed_item(
    server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trl
    from datasets import Dataset

    monkeypatch.setenv("FIRM_URL", server_url)
    monkeypatch.chdir(tmp_path)
    made = iter(range(10_000))

    def text_to_image(completion: str) -> Any:
        index = next(made)  # the second image of each batch cannot be decoded
        return broken_png() if index % 4 == 1 else picture("red" if index % 2 == 0 else "blue")

    seen: list[torch.Tensor] = []
    original = trl.GRPOTrainer._generate_and_score_completions

    def recording(self: Any, inputs: Any) -> Any:
        output = original(self, inputs)
        seen.append(output["advantages"].detach().cpu())
        return output

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", recording)
    namespace: dict[str, Any] = {
        "model": str(_tiny_policy(tmp_path / "policy")),
        "training_args": trl.GRPOConfig(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=6,
            max_steps=1,
            use_cpu=True,
            bf16=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
        ),
        "dataset": Dataset.from_dict({"prompt": ["a red square", "a blue square"]}),
        "text_to_image": text_to_image,
    }
    exec(trainer_block("trl"), namespace)
    trainer = namespace["trainer"]
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"])
    assert logged["firm_gen/failed_fraction"] == pytest.approx(0.25)
    advantages = torch.cat(seen)
    assert torch.isfinite(advantages).all() and advantages[1] == 0.0 and advantages.abs().sum() > 0
    assert trainer.reward_func_names == ["firm_gen"]


def test_a_completion_naming_a_local_file_is_never_opened(server_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    picture("red").save(secret)  # a valid image: had it been opened, the server would have scored it
    opened: list[str] = []
    watching = [True]  # an audit hook cannot be removed: after this test it only returns

    def watch(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and args and "secret.png" in str(args[0]):
            opened.append(str(args[0]))

    sys.addaudithook(watch)
    completions = [str(secret), f"file://{secret}"]
    try:
        _never_open(server_url, completions, str(secret))
    finally:
        watching[0] = False
    assert not opened


def _never_open(server_url: str, completions: list[str], secret: str) -> None:
    from clients import RewardClient
    from clients.adapters.trl import firm_reward
    from clients.adapters.verl import make_compute_score

    with RewardClient(server_url) as client:
        reward = firm_reward(client, "gen")
        with pytest.raises(ValueError, match=r"render=.*generated_images"):
            reward(prompts=["a red square"] * 2, completions=completions, trainer_state=None)
        with pytest.raises(TypeError, match="never opened"):
            reward(prompts=["a red square"] * 2, completions=completions, generated_images=completions)
        echo = firm_reward(client, "gen", render=lambda prompts, completions: completions)
        with pytest.raises(TypeError, match="never opened"):
            echo(prompts=["a red square"] * 2, completions=completions)
        verl = make_compute_score(client, "gen", render=lambda responses, infos: responses)
        with pytest.raises(TypeError, match="never opened"):
            verl(data_sources=["x"], solution_strs=[secret], ground_truths=[None], extra_infos=[{"prompt": "p"}])
