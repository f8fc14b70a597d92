"""Client side of the FIRM reward server: the wire protocol and Python clients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.client import AsyncRewardClient, RewardClient
    from clients.config import ClientConfig

__all__ = ["AsyncRewardClient", "ClientConfig", "RewardClient"]


def __getattr__(name: str) -> Any:
    # The server imports clients.protocol; loading the HTTP client only on demand keeps that light.
    if name in ("AsyncRewardClient", "RewardClient"):
        from clients import client

        return getattr(client, name)
    if name == "ClientConfig":
        from clients.config import ClientConfig

        return ClientConfig
    raise AttributeError(name)
