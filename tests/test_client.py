"""The Python client against a live firm-serve on the tiny critic, and against a flaky proxy."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import AsyncRewardClient, RewardClient
from clients.config import ClientConfig
from clients.errors import DeadlineExceeded, ItemsFailed
from clients.protocol import EditGroupResponse, GenGroupResponse, RewardWeights
from clients.retry import RetryPolicy
from tests.flaky_proxy import FlakyProxy
from tests.support import picture, running_server

FAST_RETRY = RetryPolicy(max_attempts=4, backoff_s=0.05, max_backoff_s=2.0)
INSTRUCTION = "Make the square red."


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[RewardClient]:
    with RewardClient(server_url, retry=FAST_RETRY) as client:
        yield client


def _png_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    picture(colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_route_through_the_sync_client(client: RewardClient) -> None:
    assert client.ready()
    assert {m.task for m in client.models().models} == {"edit", "gen"}
    edits = client.score_edits(picture("blue"), [picture("red"), picture("blue")], INSTRUCTION, ids=["done", "same"])
    assert [r.id for r in edits.results] == ["done", "same"]
    assert edits.rewards() == [pytest.approx(0.9), 0.0]
    gens = client.score_generations([picture("red")], "a red square", requirements="none")
    assert gens.mask() == [True]
    group = client.score_edit_group(picture("blue"), INSTRUCTION, [picture("red"), picture("blue")], group_id="g1")
    assert isinstance(group, EditGroupResponse) and group.id == "g1" and group.group.scored == 2
    gen_group = client.score_generation_group("a red square", [picture("red"), picture("green")])
    assert isinstance(gen_group, GenGroupResponse) and len(gen_group.group.advantages) == 2


def test_the_async_client_inside_a_running_event_loop(server_url: str) -> None:
    async def run() -> list[float]:
        async with AsyncRewardClient(server_url) as client:
            replies = await asyncio.gather(
                *(client.score_edit_group(picture("blue"), INSTRUCTION, [picture("red")] * 2) for _ in range(3))
            )
            return [reply.group.mean for reply in replies]  # type: ignore[misc]

    assert asyncio.run(run()) == [pytest.approx(0.9)] * 3


def test_large_batches_are_chunked_and_come_back_in_order(server_url: str) -> None:
    colours = ["red", "blue", "orange", "green", "yellow"] * 4
    with RewardClient(server_url, chunk_size=3, max_in_flight=3) as client:
        reply = client.score_edits(
            picture("blue"), [picture(c) for c in colours], INSTRUCTION, ids=[f"item-{i}" for i in range(20)]
        )
    assert [r.id for r in reply.results] == [f"item-{i}" for i in range(20)]
    unchanged = [c in ("blue", "green") for c in colours]  # cool colours: the tiny critic sees no edit
    assert [r == 0.0 for r in reply.rewards()] == unchanged


def test_every_input_type_scores_like_the_pil_image(client: RewardClient, tmp_path: Path) -> None:
    red = picture("red")
    array = np.array(red)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    path = tmp_path / "red.png"
    red.save(path)
    inputs = [
        red,
        array,
        tensor,
        str(path),
        path,
        _png_bytes("red"),
        "data:image/png;base64," + base64.b64encode(_png_bytes("red")).decode(),
    ]
    reply = client.score_generations(inputs, "a red square")
    assert reply.mask() == [True] * len(inputs)
    assert len({r.reward for r in reply.results}) == 1
    batch = client.score_generations(torch.stack([tensor, tensor]), "a red square")  # NCHW batch
    nhwc = client.score_generations(np.stack([array, array]), "a red square")  # NHWC batch
    assert batch.rewards() == nhwc.rewards() == [reply.results[0].reward] * 2


def test_bad_inputs_are_refused_before_sending(client: RewardClient) -> None:
    with pytest.raises(ValueError, match="HWC"):
        client.score_generations(np.zeros((4, 4)), "p")
    with pytest.raises(ValueError, match="uint8"):
        client.score_generations(np.zeros((4, 4, 3), dtype=np.float32), "p")
    with pytest.raises(ValueError, match="prompts"):
        client.score_generations([picture("red")] * 2, ["a", "b", "c"])


def test_a_failed_item_is_nan_and_masked_and_strict_mode_raises(server_url: str) -> None:
    broken = _png_bytes("red")[:60]  # a PNG signature, then nothing decodable
    with RewardClient(server_url) as client:
        reply = client.score_generations([picture("red"), broken], "a red square")
    assert reply.mask() == [True, False]
    assert math.isnan(reply.rewards()[1]) and reply.results[1].error.code == "invalid_image"  # type: ignore[union-attr]
    with RewardClient(server_url, strict=True) as strict, pytest.raises(ItemsFailed, match="invalid_image"):
        strict.score_generations([picture("red"), broken], "a red square")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRM_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("FIRM_API_KEY", "k")
    monkeypatch.setenv("FIRM_CHUNK_SIZE", "7")
    config = ClientConfig.from_env(timeout_s=9.0)
    assert config.base_urls == ("http://a:1", "http://b:2")
    assert (config.api_key, config.chunk_size, config.timeout_s) == ("k", 7, 9.0)
    assert ClientConfig.from_env(base_urls="http://c:3").base_urls == ("http://c:3",)


@pytest.fixture()
def proxy(server_url: str) -> Iterator[FlakyProxy]:
    with FlakyProxy(server_url) as proxy:
        yield proxy


def _one_gen(client: RewardClient):  # type: ignore[no-untyped-def]
    return client.score_generations([picture("red")], "a red square")


def test_retries_over_real_connections_share_a_request_id_and_score(proxy: FlakyProxy) -> None:
    """The retry loop and the failover transport over sockets: a dropped connection, a 429 with Retry-After
    and a 503 are each attempted again, with one X-Request-ID. Each fault alone: tests/test_client_transport.py."""
    proxy.faults.extend(["drop", "429:0.2", "503"])
    with RewardClient(proxy.url, retry=FAST_RETRY, cooldown_s=0.01) as client:
        started = time.monotonic()
        reply = _one_gen(client)
        elapsed = time.monotonic() - started
    assert reply.mask() == [True]
    assert proxy.posts == 4 and len(set(proxy.request_ids)) == 1 and proxy.request_ids[0]
    assert elapsed >= 0.2  # it waited the Retry-After before the attempt after the 429


def test_a_slow_answer_past_the_deadline_fails_the_call(proxy: FlakyProxy) -> None:
    proxy.faults.append("slow:5")
    with RewardClient(proxy.url, timeout_s=1.0, strict=True) as client, pytest.raises(DeadlineExceeded):
        _one_gen(client)


def test_failover_when_a_server_stops_mid_run(server_url: str, tiny_checkpoint: Path, cache_dir: Path) -> None:
    replies: list[EditGroupResponse] = []
    answered = threading.Condition()  # notified at each reply, and when the rollouts end
    stop, ended = threading.Event(), threading.Event()

    def rollouts(client: RewardClient) -> None:
        try:
            while not stop.is_set():
                reply = client.score_edit_group(picture("blue"), INSTRUCTION, [picture("red")] * 2)
                with answered:
                    replies.append(reply)
                    answered.notify_all()
        finally:
            with answered:
                ended.set()
                answered.notify_all()

    def wait_for_replies(count: int) -> None:
        with answered:
            answered.wait_for(lambda: len(replies) >= count or ended.is_set(), timeout=120)
        assert len(replies) >= count, f"{len(replies)} of {count} replies; the rollouts ended: {ended.is_set()}"

    client = worker = None
    try:
        with running_server(cache_dir) as second:
            client = RewardClient([second, server_url], retry=FAST_RETRY, timeout_s=60)
            worker = threading.Thread(target=rollouts, args=(client,), daemon=True)
            worker.start()
            wait_for_replies(3)
        stopped_at = len(replies)  # `second` is gone (SIGTERM); the rollouts go on
        wait_for_replies(stopped_at + 6)
    finally:
        stop.set()
        if worker is not None:
            worker.join(120)
        if client is not None:
            client.close()
    assert all(r.group.scored == 2 for r in replies), [r.results[0].error for r in replies if r.group.scored < 2]


def test_weights_and_score_mode_pass_through(client: RewardClient) -> None:
    reply = client.score_edits(
        picture("blue"), [picture("red")], INSTRUCTION, weights=RewardWeights(w1=0.5, w2=0.5), score_mode="expected"
    )
    assert reply.score_mode == "expected" and reply.weights.w1 == 0.5
    assert reply.results[0].reward not in (None, 0.9)
