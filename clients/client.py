"""Python clients of the FIRM reward server: `AsyncRewardClient`, and `RewardClient` around it.

The logic is written once, async; the sync client runs it on a private event loop thread, so
it also works inside notebooks and trainers that have a loop of their own.

    >>> from clients import RewardClient                                  # doctest: +SKIP
    >>> with RewardClient("http://127.0.0.1:8000") as client:               # doctest: +SKIP
    ...     reply = client.score_edit_group(source, "Make the car red.", candidates)
    ...     reply.group.advantages, reply.mask()

A call goes through three layers: the scoring method builds the protocol's request, the retry
loop (`clients.transport.send_with_retries`) sends it under the retry policy, and the failover
transport (`clients.transport.FailoverTransport`) picks the replica that answers it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import httpx
from pydantic import ValidationError

from clients.config import ClientConfig
from clients.errors import BadResponse, FirmError, ItemsFailed, NoServerAvailable, server_error
from clients.images import Encoder, ImageLike, split_batch
from clients.protocol import (
    EditGroupRequest,
    EditGroupResponse,
    EditItem,
    EditScoreRequest,
    EditScoreResponse,
    GenGroupRequest,
    GenGroupResponse,
    GenItem,
    GenScoreRequest,
    GenScoreResponse,
    ModelsResponse,
    ReadinessResponse,
    RewardWeights,
    ScoreMode,
    ScoringRequest,
    failed_response,
)
from clients.retry import RetryPolicy
from clients.tasks import TASKS
from clients.transport import ORIGIN, FailoverTransport, send_with_retries

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R", EditScoreResponse, EditGroupResponse, GenScoreResponse, GenGroupResponse)


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    values = split_batch(value)
    if len(values) == 1 and n > 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name}: expected 1 or {n} values, got {len(values)}")
    return values


def _texts(value: str | Sequence[str | None] | None, n: int, name: str) -> list[str | None]:
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


def _route(request: ScoringRequest) -> str:
    spec = TASKS[request.task]
    return spec.group_path if isinstance(request, spec.group_request) else spec.score_path


def _size(request: ScoringRequest) -> int:
    """How many results the reply to `request` holds: one per item, or per group member."""
    spec = TASKS[request.task]
    if isinstance(request, spec.group_request):
        return len(getattr(request, spec.group_members))
    return len(request.items)  # type: ignore[union-attr]


def _stand_in(request: ScoringRequest, answer: R | FirmError) -> R:
    """The reply, or the stand-in of a request that failed: every item without a reward, and why."""
    if isinstance(answer, FirmError):
        return cast(R, failed_response(request, str(answer)))
    return answer


def _options(
    weights: RewardWeights | None, score_mode: ScoreMode | None, return_reasoning: bool, timeout_s: float | None
) -> dict[str, Any]:
    return {"weights": weights, "score_mode": score_mode, "return_reasoning": return_reasoning, "timeout_s": timeout_s}


def call_deadline(timeout_s: float) -> float:
    """How long the client waits for a call that carries the server deadline `timeout_s`: a little longer,
    so the server's answer (its late items failed as `deadline`) arrives before the client gives up.

    >>> call_deadline(10.0), call_deadline(100.0)
    (12.0, 110.0)
    """
    return timeout_s + max(2.0, 0.1 * timeout_s)


class AsyncRewardClient:
    """Scores edits and generated images over HTTP.

    Each option left out comes from its FIRM_* variable, else from `ClientConfig`'s default (see
    `ClientConfig` for what each one does); or pass a whole `config`. `http_transport` carries the
    requests to the servers (tests pass `httpx.MockTransport`, in-process runs `httpx.ASGITransport`).
    """

    def __init__(
        self,
        base_urls: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
        chunk_size: int | None = None,
        max_in_flight: int | None = None,
        strict: bool | None = None,
        image_format: str | None = None,
        jpeg_quality: int | None = None,
        cooldown_s: float | None = None,
        retry: RetryPolicy | None = None,
        config: ClientConfig | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.of(
            config,
            base_urls=base_urls,
            api_key=api_key,
            timeout_s=timeout_s,
            chunk_size=chunk_size,
            max_in_flight=max_in_flight,
            strict=strict,
            image_format=image_format,
            jpeg_quality=jpeg_quality,
            cooldown_s=cooldown_s,
            retry=retry,
        )
        urls = self.config.base_urls
        limits = httpx.Limits(max_connections=max(16, 4 * self.config.max_in_flight * len(urls)))
        self._replicas = FailoverTransport(
            urls, cooldown_s=self.config.cooldown_s, transport=http_transport, limits=limits
        )
        key = self.config.api_key
        self._http = httpx.AsyncClient(
            base_url=ORIGIN,
            transport=self._replicas,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=self.config.timeout_s,
        )

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ status

    async def models(self) -> ModelsResponse:
        response = await self._get("/v1/models")
        if response.status_code != 200:  # the same typed errors as the scoring calls (a wrong key: Unauthorized)
            raise server_error(response)
        try:
            return ModelsResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:  # not JSON, or not the protocol's list of models
            raise BadResponse(f"GET /v1/models: the answer is not the list of models: {exc}") from exc

    async def ready(self) -> bool:
        """Whether the least busy awake server says it is ready."""
        try:
            return (await self._get("/readyz")).status_code == 200
        except NoServerAvailable:
            return False

    async def readiness(self) -> ReadinessResponse:
        """The least busy awake server's readiness, with each task's state (`ready`, `loading`, `failed`, ...).
        A 503 is an answer here, not an error: it says which task is not ready."""
        response = await self._get("/readyz")
        if response.status_code not in (200, 503):
            raise server_error(response)
        try:
            return ReadinessResponse.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise BadResponse(f"GET /readyz: the answer is not a readiness report: {exc}") from exc

    # ------------------------------------------------------------------ plumbing

    async def _get(self, path: str) -> httpx.Response:
        """A status GET to the least busy awake server, not retried: it asks about now."""
        try:
            return await self._http.get(path)
        except httpx.RequestError as exc:
            raise NoServerAvailable(f"{type(exc).__name__}: {exc}") from exc

    async def _post(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The JSON object of the 200 answer to a scoring POST, after the retries the policy allows within
        `timeout_s`."""
        response = await send_with_retries(
            self._http,
            self._http.build_request("POST", path, json=body),
            self.config.retry,
            timeout_s=timeout_s,
            can_fail_over=self._replicas.can_fail_over,
        )
        try:
            answer = response.json()
        except ValueError as exc:
            raise BadResponse(f"a 200 answer that is not JSON: {response.text[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise BadResponse(f"a 200 answer that is not a JSON object: {response.text[:200]!r}")
        return answer

    async def _encode(self, build: Callable[[Encoder], T]) -> T:
        """Encode images off the event loop (64 large images take a while, PNG ones most) as the config says."""
        encoder = Encoder(self.config.image_format, self.config.jpeg_quality)
        return await asyncio.to_thread(build, encoder)

    def _check(self, response: R) -> R:
        if self.config.strict and (failures := response.errors()):
            raise ItemsFailed(failures)
        return response

    async def _answer(self, request: ScoringRequest, model: type[R]) -> R | FirmError:
        """The server's reply to one request, or the error that stopped it (raised when strict): an error
        status after the retries, no connection, a body that is not the protocol's reply to the request."""
        try:
            body = await self._post(
                _route(request),
                request.model_dump(mode="json", exclude_none=True),
                self.config.timeout_s if request.timeout_s is None else call_deadline(request.timeout_s),
            )
            try:
                reply = model.model_validate(body)
            except ValidationError as exc:
                raise BadResponse(f"the reply does not match the protocol: {exc}") from exc
            if len(reply.results) != (n := _size(request)):
                raise BadResponse(f"the reply holds {len(reply.results)} results for {n} items")
            return reply
        except FirmError as exc:
            if self.config.strict:
                raise
            return exc

    async def _score_group(self, request: EditGroupRequest | GenGroupRequest, model: type[R]) -> R:
        """Not strict, a call that fails is a reply whose items carry the error and a null reward, so a
        training loop never stops on a reward."""
        return self._check(_stand_in(request, await self._answer(request, model)))

    async def _score_items(self, request: EditScoreRequest | GenScoreRequest, model: type[R]) -> R:
        """Send the items in chunks, a bounded number at once; results come back in input order."""
        size = self.config.chunk_size
        chunks = [
            request.model_copy(update={"items": request.items[i : i + size]}) for i in range(0, _size(request), size)
        ]
        gate = asyncio.Semaphore(self.config.max_in_flight)

        async def send(chunk: EditScoreRequest | GenScoreRequest) -> R | FirmError:
            async with gate:
                return await self._answer(chunk, model)

        answers = await asyncio.gather(*(send(chunk) for chunk in chunks))
        replies = [_stand_in(chunk, answer) for chunk, answer in zip(chunks, answers, strict=True)]
        header = next((a for a in answers if not isinstance(a, FirmError)), replies[0])
        return self._check(header.model_copy(update={"results": [r for reply in replies for r in reply.results]}))

    # ------------------------------------------------------------------ scoring
    # Requests are built unvalidated: the server judges them against its own limits, and a request it
    # refuses (422) fails like any other call, as null rewards with the reason unless strict.

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
        timeout_s: float | None = None,
    ) -> EditScoreResponse:
        """Score edits on execution and consistency (CME reward). A single source or instruction
        is shared by every edited image; images may be PIL, numpy, torch (or a batch), paths or bytes."""
        edited_list = split_batch(edited)
        n = len(edited_list)
        sources_list = _broadcast(sources, n, "sources")
        texts = _texts(instructions, n, "instructions")
        item_ids = _item_ids(ids, n)

        def build(encode: Encoder) -> EditScoreRequest:
            items = [
                EditItem.model_construct(
                    id=item_ids[i], source=encode(sources_list[i]), edited=encode(edited_list[i]), instruction=texts[i]
                )
                for i in range(n)
            ]
            return EditScoreRequest.model_construct(
                items=items, **_options(weights, score_mode, return_reasoning, timeout_s)
            )

        return await self._score_items(await self._encode(build), EditScoreResponse)

    async def score_generations(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: str | Sequence[str],
        *,
        requirements: str | Sequence[str | None] | None = None,
        ids: Sequence[str] | None = None,
        weights: RewardWeights | None = None,
        score_mode: ScoreMode | None = None,
        return_reasoning: bool = False,
        timeout_s: float | None = None,
    ) -> GenScoreResponse:
        """Score generated images on instruction following and quality (QMA reward)."""
        image_list = split_batch(images)
        n = len(image_list)
        prompt_list = _texts(prompts, n, "prompts")
        requirement_list = _texts(requirements, n, "requirements")
        item_ids = _item_ids(ids, n)

        def build(encode: Encoder) -> GenScoreRequest:
            items = [
                GenItem.model_construct(
                    id=item_ids[i], image=encode(image_list[i]), prompt=prompt_list[i], requirement=requirement_list[i]
                )
                for i in range(n)
            ]
            return GenScoreRequest.model_construct(
                items=items, **_options(weights, score_mode, return_reasoning, timeout_s)
            )

        return await self._score_items(await self._encode(build), GenScoreResponse)

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
        timeout_s: float | None = None,
    ) -> EditGroupResponse:
        """Score a GRPO group of edits of one source; the reply carries group mean, std and advantages."""
        candidate_list = split_batch(candidates)

        def build(encode: Encoder) -> EditGroupRequest:
            return EditGroupRequest.model_construct(
                id=group_id,
                source=encode(source),
                instruction=instruction,
                candidates=[encode(c) for c in candidate_list],
                **_options(weights, score_mode, return_reasoning, timeout_s),
            )

        return await self._score_group(await self._encode(build), EditGroupResponse)

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
        timeout_s: float | None = None,
    ) -> GenGroupResponse:
        """Score a GRPO group of images generated for one prompt."""
        image_list = split_batch(images)

        def build(encode: Encoder) -> GenGroupRequest:
            return GenGroupRequest.model_construct(
                id=group_id,
                prompt=prompt,
                requirement=requirement,
                images=[encode(i) for i in image_list],
                **_options(weights, score_mode, return_reasoning, timeout_s),
            )

        return await self._score_group(await self._encode(build), GenGroupResponse)


def _blocking(
    method: Callable[Concatenate[AsyncRewardClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[RewardClient, P], T]:
    """The sync twin of an AsyncRewardClient method: same arguments, same docs."""

    @functools.wraps(method)
    def call(self: RewardClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    return call


def _submitting(
    method: Callable[Concatenate[AsyncRewardClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[RewardClient, P], concurrent.futures.Future[T]]:
    """The twin of a scoring method that starts it without waiting: same arguments, a future of the reply."""

    def start(self: RewardClient, /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(method(self._client, *args, **kwargs), self._loop)

    start.__name__ = "submit_" + method.__name__.removeprefix("score_")
    start.__qualname__ = f"RewardClient.{start.__name__}"
    start.__doc__ = (
        f"Start `{method.__name__}` without waiting: the returned future resolves to its reply. Lets a caller "
        "overlap scoring with its own work, such as sampling the next GRPO group."
    )
    return start


class RewardClient:
    """Blocking client with the same methods and options as `AsyncRewardClient`, and `submit_*` twins of the
    scoring methods that return a future instead of waiting."""

    def __init__(
        self,
        base_urls: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
        chunk_size: int | None = None,
        max_in_flight: int | None = None,
        strict: bool | None = None,
        image_format: str | None = None,
        jpeg_quality: int | None = None,
        cooldown_s: float | None = None,
        retry: RetryPolicy | None = None,
        config: ClientConfig | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.of(
            config,
            base_urls=base_urls,
            api_key=api_key,
            timeout_s=timeout_s,
            chunk_size=chunk_size,
            max_in_flight=max_in_flight,
            strict=strict,
            image_format=image_format,
            jpeg_quality=jpeg_quality,
            cooldown_s=cooldown_s,
            retry=retry,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="firm-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(self.config, http_transport))

    @staticmethod
    async def _make(config: ClientConfig, http_transport: httpx.AsyncBaseTransport | None) -> AsyncRewardClient:
        return AsyncRewardClient(config=config, http_transport=http_transport)  # its httpx client: the loop's

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

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
    submit_edits = _submitting(AsyncRewardClient.score_edits)
    submit_generations = _submitting(AsyncRewardClient.score_generations)
    submit_edit_group = _submitting(AsyncRewardClient.score_edit_group)
    submit_generation_group = _submitting(AsyncRewardClient.score_generation_group)
