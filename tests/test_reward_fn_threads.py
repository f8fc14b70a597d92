"""The release's trainers call the reward function from a pool of 8 threads at once (train_nft_sd3.py line
565, train_nft_qwen_image_edit.py line 573, at VisionXLab/FIRM-Reward ba41493): each call must get its own
failures back, whatever the others do, and the shared reward function must keep none of them.

A mock server (httpx.MockTransport) holds every request until all 8 calls are in flight, then fails one
item of each, a different one per call, with a reason that names the call.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from clients import RewardClient
from clients.adapters.flow_grpo import gen_reward_fn
from tests.support import picture

CALLS, ITEMS = 8, 4
DEADLINE_S = 30.0


class HoldUntilAllArrive:
    """Answers gen score requests once `CALLS` of them are in flight. The item `call % ITEMS` of each call
    (its prompt reads "call C item I") fails with a parse error naming the call."""

    def __init__(self) -> None:
        self.arrived = 0
        self.all_in: asyncio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"ready": True, "models": {}})
        if self.all_in is None:
            self.all_in = asyncio.Event()  # made on the client's own loop
        self.arrived += 1
        if self.arrived == CALLS:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), DEADLINE_S)
        items = json.loads(request.content)["items"]
        return httpx.Response(200, json={**_header(), "results": [_result(item) for item in items]})


def _header() -> dict[str, Any]:
    return {"model": {"name": "critic"}, "score_mode": "argmax", "weights": {"w1": 0.4, "w2": 0.6}}


def _result(item: dict[str, Any]) -> dict[str, Any]:
    call, index = (int(word) for word in item["prompt"].split()[1::2])
    if index == call % ITEMS:
        error = {"code": "parse_error", "message": f"no score in the answer of call {call}"}
        return {"id": item["id"], "reward": None, "error": error}
    dimension = {"score": 5, "expected": None, "normalized": 1.0}
    quality = {**dimension, "subscores": {"aesthetics": 5, "technical_quality": 5, "structure_texture": 5}}
    return {"id": item["id"], "instruction_following": dimension, "quality": quality, "reward": 1.0, "error": None}


def test_eight_concurrent_calls_each_get_their_own_failures() -> None:
    server = HoldUntilAllArrive()
    with RewardClient("http://critic:8000", http_transport=httpx.MockTransport(server)) as client:
        reward_fn = gen_reward_fn(client, on_failure="nan")
        images = [picture("red")] * ITEMS
        with ThreadPoolExecutor(max_workers=8) as executor:
            futures = [
                executor.submit(reward_fn, images, [f"call {c} item {i}" for i in range(ITEMS)], None, only_strict=True)
                for c in range(CALLS)
            ]
            replies = [future.result(timeout=DEADLINE_S) for future in futures]
    assert server.arrived == CALLS  # all were in flight together
    for call, (rewards, extra) in enumerate(replies):
        failed = call % ITEMS
        assert extra == {"errors": [(failed, f"parse_error: no score in the answer of call {call}")]}
        assert np.flatnonzero(rewards["failed"]).tolist() == [failed] and np.isnan(rewards["avg"][failed])
    assert not any("error" in name for name in vars(reward_fn))  # nothing of a call is left on the function
