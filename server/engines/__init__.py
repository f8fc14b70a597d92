"""Engines: one interface (`base.Engine`), several back ends, chosen by `create_engine`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult, WatchedStep

__all__ = [
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "WatchedStep",
    "create_engine",
    "resolve_engine_name",
]

BUILT_IN = ("transformers",)


def resolve_engine_name(name: str) -> str:
    """'auto' picks the best engine this machine has; other names pass through."""
    if name != "auto":
        return name
    return "transformers"


def _load_plugin(spec: str) -> type[Engine]:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"engine {spec!r}: use a built-in name {BUILT_IN} or 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"engine {spec!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ValueError(f"engine {spec!r} is not a subclass of server.engines.base.Engine")
    return cls


def create_engine(name: str, model: str, watch_tokens: Sequence[str], **options: Any) -> Engine:
    """Build an engine by name; `options` (revision, device, dtype) go to its constructor."""
    name = resolve_engine_name(name)
    if name == "transformers":
        from server.engines.transformers import TransformersEngine

        return TransformersEngine(model, watch_tokens, **options)
    return _load_plugin(name)(model, watch_tokens, **options)
