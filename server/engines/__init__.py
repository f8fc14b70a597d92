"""Engines: one interface (`base.Engine`), several back ends, chosen by `create_engine`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

from server.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OutputConstraint,
    WatchedStep,
    cuda_available,
)

__all__ = [
    "BUILT_IN",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "OutputConstraint",
    "WatchedStep",
    "create_engine",
    "resolve_engine_name",
]

BUILT_IN = ("transformers", "vllm", "openai")


def resolve_engine_name(name: str) -> tuple[str, str]:
    """The engine to use and why: 'auto' picks vLLM when it is installed and CUDA is present."""
    if name != "auto":
        return name, "chosen in the settings"
    if importlib.util.find_spec("vllm") is None:
        return "transformers", "auto: vllm is not installed"
    if not cuda_available():
        return "transformers", "auto: vllm is installed but no CUDA device is visible"
    return "vllm", "auto: vllm is installed and CUDA is available"


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


def engine_class(name: str) -> type[Engine]:
    """The class behind an engine name (already resolved from 'auto'). vllm is imported only here."""
    if name == "transformers":
        from server.engines.transformers import TransformersEngine

        return TransformersEngine
    if name == "vllm":
        from server.engines.vllm import VLLMEngine

        return VLLMEngine
    if name == "openai":
        from server.engines.openai import OpenAIEngine

        return OpenAIEngine
    return _load_plugin(name)


def create_engine(name: str, model: str, watch_tokens: Sequence[str], **options: Any) -> Engine:
    """Build an engine by resolved name; `options` (revision, device, ...) go to its constructor."""
    return engine_class(name)(model, watch_tokens, **options)
