"""What travels between the ingress and a critic replica: one scoring call and its outcome.

The ingress reads, checks and parses each HTTP request with the server's own app (middleware,
schema, error mapping); what it hands a critic replica through a Ray deployment handle is the
parsed request, with the request id and key name the replica's log lines carry. The replica
answers with the scoring response, or with the refusal its scoring service raised, which the
ingress raises again for the server's error handlers to answer. Ray carries both inside its own
transport with its object serialisation; nothing here listens on a port.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from clients.protocol import ScoringRequest, ScoringResponse
from server.errors import ServiceError
from server.images import ImageTooLarge
from server.logs import caller, request_id

REPLICA_HEADER = b"x-firm-replica"  # names the critic replica that scored a request
REFUSALS = (ServiceError, ImageTooLarge)  # what the scoring service raises for a request it refuses


@dataclass(frozen=True)
class Call:
    """One scoring request as the ingress parsed it, with the context of its log lines."""

    request: ScoringRequest
    request_id: str | None = None
    caller: str | None = None  # the API key's name

    @classmethod
    def here(cls, request: ScoringRequest) -> Call:
        """`request` in the context of the HTTP request being served."""
        return cls(request, request_id=request_id.get(), caller=caller.get())

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Log lines written meanwhile carry the call's request id and key name, as at the ingress."""
        tokens = request_id.set(self.request_id), caller.set(self.caller)
        try:
            yield
        finally:
            request_id.reset(tokens[0])
            caller.reset(tokens[1])


@dataclass(frozen=True)
class Refusal:
    """An exception the scoring service refused a request with, carried as data: the exception's class,
    its arguments and attributes. It is rebuilt without its constructor, whose parameters need not be
    its arguments (an `ImageTooLarge` takes a field, a reason and a limit and holds one message)."""

    kind: type[BaseException]
    args: tuple[Any, ...]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, error: BaseException) -> Refusal:
        return cls(type(error), error.args, dict(vars(error)))

    def error(self) -> BaseException:
        """The exception again, as the scoring service raised it."""
        error = self.kind.__new__(self.kind, *self.args)
        error.args = self.args
        error.__dict__.update(self.attributes)
        return error


@dataclass(frozen=True)
class Outcome:
    """A critic replica's answer to one call: the response or the refusal, and the replica's name."""

    replica: str
    response: ScoringResponse | None = None
    refusal: Refusal | None = None

    def result(self) -> ScoringResponse:
        """The response, or the refusal raised."""
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.response is not None
        return self.response
