"""Python clients of the FIRM reward server: `AsyncRewardClient`, and `RewardClient` around it.

The logic is written once, async; the sync client runs it on a private event loop thread, so
it also works inside notebooks and trainers that have a loop of their own.

    >>> from clients import RewardClient                                  # doctest: +SKIP
    >>> with RewardClient("http://127.0.0.1:8000") as client:               # doctest: +SKIP
    ...     reply = client.score_edit_group(source, "Make the car red.", candidates)
    ...     reply.group.advantages, reply.mask()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from clients.config import ClientConfig
from clients.errors import BadResponse, FirmError, ItemsFailed, RequestFailed
from clients.images import Encoder, ImageLike, split_batch
from clients.protocol import (
    EditGroupResponse,
    EditResult,
    EditScoreResponse,
    GenGroupResponse,
    GenResult,
    GenScoreResponse,
    GroupStats,
    ItemError,
    ModelRef,
    ModelsResponse,
    ReadinessResponse,
    RewardWeights,
    ScoreMode,
)
from clients.transport import Transport, server_error

T = TypeVar("T")
R = TypeVar("R", EditScoreResponse, GenScoreResponse)
_UNANSWERED = ModelRef(name="unavailable")
_PAPER_WEIGHTS = {"edit": RewardWeights(w1=0.6, w2=0.4), "gen": RewardWeights(w1=0.4, w2=0.6)}


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    values = split_batch(value)
    if len(values) == 1 and n > 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name}: expected 1 or {n} values, got {len(values)}")
    return values


def _texts(value: str | Sequence[str] | None, n: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name}: expected one per item ({n}), got {len(value)}")
    return list(value)


def _item_ids(ids: Sequence[str] | None, n: int) -> list[str]:
    """The ids to send: the caller's, or the items' positions."""
    item_ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
    if len(item_ids) != n:
        raise ValueError(f"ids: expected {n}, got {len(item_ids)}")
    return item_ids


class AsyncRewardClient:
    """Scores edits and generated images over HTTP; see `ClientConfig` for every setting."""

    def __init__(
        self,
        base_urls: str | Sequence[str] | None = None,
        *,
        config: ClientConfig | None = None,
        http_transport: Any = None,
        **settings: Any,
    ) -> None:
        self.config = config or ClientConfig.from_env(base_urls=base_urls, **settings)
        self._transport = Transport(self.config, http_transport)

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # ------------------------------------------------------------------ status

    async def models(self) -> ModelsResponse:
        response = await self._transport.get("/v1/models")
        if response.status_code != 200:  # the same typed errors as the scoring calls (a wrong key: Unauthorized)
            raise server_error(response)
        try:
            return ModelsResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:  # not JSON, or not the protocol's list of models
            raise BadResponse(f"GET /v1/models: the answer is not the list of models: {exc}") from exc

    async def ready(self) -> bool:
        """Whether the least busy awake server says it is ready."""
        try:
            return (await self._transport.get("/readyz")).status_code == 200
        except (RequestFailed, OSError):
            return False

    async def readiness(self) -> ReadinessResponse:
        """The least busy awake server's readiness, with each task's state (`ready`, `loading`, `failed`, ...).
        A 503 is an answer here, not an error: it says which task is not ready."""
        response = await self._transport.get("/readyz")
        if response.status_code not in (200, 503):
            raise server_error(response)
        try:
            return ReadinessResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise BadResponse(f"GET /readyz: the answer is not a readiness report: {exc}") from exc

    # ------------------------------------------------------------------ plumbing

    def _options(
        self, weights: RewardWeights | None, score_mode: ScoreMode | None, return_reasoning: bool
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"return_reasoning": return_reasoning}
        if weights is not None:
            options["weights"] = weights.model_dump()
        if score_mode is not None:
            options["score_mode"] = score_mode
        return options

    async def _encode(self, build: Callable[[Encoder], T]) -> T:
        """Encode images off the event loop (PNG of 64 large images takes a while)."""
        encoder = Encoder(self.config.image_format, self.config.jpeg_quality)
        return await asyncio.to_thread(build, encoder)

    def _check(self, response: T) -> T:
        if self.config.strict and (failures := response.errors()):  # type: ignore[attr-defined]
            raise ItemsFailed(failures)
        return response

    async def _chunked(
        self, path: str, items: list[dict[str, Any]], options: dict[str, Any], model: type[R], task: str
    ) -> R:
        """Send items in chunks, a bounded number at once; results come back in input order."""
        size = self.config.chunk_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        gate = asyncio.Semaphore(self.config.max_in_flight)

        async def send(chunk: list[dict[str, Any]]) -> R:
            async with gate:
                ids = [str(it["id"]) for it in chunk]
                return await self._reply(path, {"items": chunk, **options}, model, ids, task)

        replies = await asyncio.gather(*(send(c) for c in chunks))
        answered = next((r for r in replies if r.model != _UNANSWERED), replies[0])
        results = [result for reply in replies for result in reply.results]
        return self._check(answered.model_copy(update={"results": results}))

    async def _reply(self, path: str, body: dict[str, Any], model: type[T], ids: list[str], task: str) -> T:
        """The server's reply to one request. Not strict: any failure of the call (an error status after
        the retries, no connection, a body that is not the protocol's reply) becomes a stand-in reply
        whose items carry the error and a null reward, so a training loop never stops on a reward."""
        try:
            try:
                reply = model.model_validate(await self._transport.post(path, body))  # type: ignore[attr-defined]
            except ValidationError as exc:
                raise BadResponse(f"the reply does not match the protocol: {exc}") from exc
            if len(reply.results) != len(ids):
                raise BadResponse(f"the reply holds {len(reply.results)} results for {len(ids)} items")
            return reply  # type: ignore[no-any-return]
        except FirmError as exc:
            if self.config.strict:
                raise
            return self._failed(model, ids, exc, body, task)

    @staticmethod
    def _failed(model: type[T], ids: list[str], exc: Exception, options: dict[str, Any], task: str) -> T:
        """A reply standing in for a request that failed: every item without a reward, and why."""
        error = ItemError(code="request_failed", message=str(exc))
        result = EditResult if task == "edit" else GenResult
        fields: dict[str, Any] = {
            "model": _UNANSWERED,
            "score_mode": options.get("score_mode", "argmax"),
            "weights": options.get("weights") or _PAPER_WEIGHTS[task],
            "results": [result(id=i, reward=None, error=error) for i in ids],
        }
        if "group" in model.model_fields:  # type: ignore[attr-defined]
            fields["group"] = GroupStats(mean=None, std=None, advantages=[None] * len(ids), scored=0)
        return model.model_validate(fields)  # type: ignore[attr-defined]

    async def _group(self, path: str, body: dict[str, Any], model: type[T], n: int, task: str) -> T:
        return self._check(await self._reply(path, body, model, [str(i) for i in range(n)], task))

    # ------------------------------------------------------------------ scoring

    async def score_edits(
        self,
        sources: ImageLike | Sequence[ImageLike],
        edited: ImageLike | Sequence[ImageLike],
        instructions: str | Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        weights: RewardWeights | None = None,
        score_mode: ScoreMode | None = None,
        return_reasoning: bool = False,
    ) -> EditScoreResponse:
        """Score edits on execution and consistency (CME reward). A single source or instruction
        is shared by every edited image; images may be PIL, numpy, torch (or a batch), paths or bytes."""
        edited_list = split_batch(edited)
        n = len(edited_list)
        sources_list = _broadcast(sources, n, "sources")
        texts = _texts(instructions, n, "instructions")
        item_ids = _item_ids(ids, n)

        def build(encode: Encoder) -> list[dict[str, Any]]:
            return [
                {
                    "id": item_ids[i],
                    "source": encode(sources_list[i]),
                    "edited": encode(edited_list[i]),
                    "instruction": texts[i],
                }
                for i in range(n)
            ]

        items = await self._encode(build)
        options = self._options(weights, score_mode, return_reasoning)
        return await self._chunked("/v1/edit/score", items, options, EditScoreResponse, "edit")

    async def score_generations(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: str | Sequence[str],
        *,
        requirements: str | Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        weights: RewardWeights | None = None,
        score_mode: ScoreMode | None = None,
        return_reasoning: bool = False,
    ) -> GenScoreResponse:
        """Score generated images on instruction following and quality (QMA reward)."""
        image_list = split_batch(images)
        n = len(image_list)
        prompt_list = _texts(prompts, n, "prompts")
        requirement_list = _texts(requirements, n, "requirements")
        item_ids = _item_ids(ids, n)

        def build(encode: Encoder) -> list[dict[str, Any]]:
            items = []
            for i in range(n):
                item = {"id": item_ids[i], "image": encode(image_list[i]), "prompt": prompt_list[i]}
                if requirement_list[i] is not None:
                    item["requirement"] = requirement_list[i]
                items.append(item)
            return items

        items = await self._encode(build)
        options = self._options(weights, score_mode, return_reasoning)
        return await self._chunked("/v1/gen/score", items, options, GenScoreResponse, "gen")

    async def score_edit_group(
        self,
        source: ImageLike,
        instruction: str,
        candidates: ImageLike | Sequence[ImageLike],
        *,
        group_id: str | None = None,
        weights: RewardWeights | None = None,
        score_mode: ScoreMode | None = None,
        return_reasoning: bool = False,
    ) -> EditGroupResponse:
        """Score a GRPO group of edits of one source; the reply carries group mean, std and advantages."""
        candidate_list = split_batch(candidates)

        def build(encode: Encoder) -> dict[str, Any]:
            body = {
                "source": encode(source),
                "instruction": instruction,
                "candidates": [encode(c) for c in candidate_list],
            }
            return body | ({"id": group_id} if group_id is not None else {})

        body = await self._encode(build) | self._options(weights, score_mode, return_reasoning)
        return await self._group("/v1/edit/score_group", body, EditGroupResponse, len(candidate_list), "edit")

    async def score_generation_group(
        self,
        prompt: str,
        images: ImageLike | Sequence[ImageLike],
        *,
        requirement: str | None = None,
        group_id: str | None = None,
        weights: RewardWeights | None = None,
        score_mode: ScoreMode | None = None,
        return_reasoning: bool = False,
    ) -> GenGroupResponse:
        """Score a GRPO group of images generated for one prompt."""
        image_list = split_batch(images)

        def build(encode: Encoder) -> dict[str, Any]:
            body: dict[str, Any] = {"prompt": prompt, "images": [encode(i) for i in image_list]}
            if requirement is not None:
                body["requirement"] = requirement
            return body | ({"id": group_id} if group_id is not None else {})

        body = await self._encode(build) | self._options(weights, score_mode, return_reasoning)
        return await self._group("/v1/gen/score_group", body, GenGroupResponse, len(image_list), "gen")


def _blocking(method: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """The sync twin of an AsyncRewardClient method: same arguments, same docs."""

    @functools.wraps(method)
    def call(self: RewardClient, *args: Any, **kwargs: Any) -> T:
        return self._run(getattr(self._client, method.__name__)(*args, **kwargs))

    return call


class RewardClient:
    """Blocking client with the same methods as `AsyncRewardClient`."""

    def __init__(self, base_urls: str | Sequence[str] | None = None, **settings: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="firm-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(base_urls, settings))
        self.config = self._client.config

    @staticmethod
    async def _make(base_urls: str | Sequence[str] | None, settings: dict[str, Any]) -> AsyncRewardClient:
        return AsyncRewardClient(base_urls, **settings)  # the httpx client must belong to the loop thread

    def _run(self, coroutine: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start `method` (e.g. "score_edit_group") without waiting: the returned future resolves to its reply.
        Lets a caller overlap scoring with its own work, such as sampling the next GRPO group."""
        if not method.startswith("score_"):
            raise ValueError(f"submit() runs scoring methods only, not {method!r}")
        return asyncio.run_coroutine_threadsafe(getattr(self._client, method)(*args, **kwargs), self._loop)

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    models = _blocking(AsyncRewardClient.models)
    ready = _blocking(AsyncRewardClient.ready)
    readiness = _blocking(AsyncRewardClient.readiness)
    score_edits = _blocking(AsyncRewardClient.score_edits)
    score_generations = _blocking(AsyncRewardClient.score_generations)
    score_edit_group = _blocking(AsyncRewardClient.score_edit_group)
    score_generation_group = _blocking(AsyncRewardClient.score_generation_group)
