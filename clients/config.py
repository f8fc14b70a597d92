"""Client settings from arguments or FIRM_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from clients.images import IMAGE_FORMATS, RELEASE_FORMAT, RELEASE_QUALITY
from clients.retry import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ClientConfig:
    """How a client reaches the reward service.

    base_urls: one or more servers of the same critics (FIRM_URLS, comma-separated, or FIRM_URL).
    api_key: bearer key (FIRM_API_KEY). timeout_s: the deadline of one call, retries included
    (FIRM_TIMEOUT_S). chunk_size: items per request (FIRM_CHUNK_SIZE); max_in_flight: requests
    one call keeps open at once (FIRM_MAX_IN_FLIGHT). strict: raise when an item fails instead of
    returning a NaN reward (FIRM_STRICT). cooldown_s: how long a failing server rests before its
    readiness is checked again. retry: the retry policy of a scoring call (attempts, backoff;
    Retry-After is honoured).

    image_format (FIRM_IMAGE_FORMAT: JPEG, PNG or WEBP) and jpeg_quality (FIRM_JPEG_QUALITY, 1-100,
    WebP's too): how the client encodes pixels. The default, JPEG at 75, is how the FIRM release's
    trainers send every image, so the critics score what they scored there; PNG shows the critic
    the exact pixels, at several times the bytes and the encode time.
    """

    base_urls: tuple[str, ...] = (DEFAULT_URL,)
    api_key: str | None = None
    timeout_s: float = 600.0
    chunk_size: int = 32
    max_in_flight: int = 4
    strict: bool = False
    image_format: str = RELEASE_FORMAT
    jpeg_quality: int = RELEASE_QUALITY
    cooldown_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("at least one base URL is needed")
        if self.chunk_size < 1 or self.max_in_flight < 1:
            raise ValueError("chunk_size and max_in_flight must be at least 1")
        if not self.timeout_s > 0 or self.cooldown_s < 0:
            raise ValueError("timeout_s must be positive and cooldown_s not negative")
        object.__setattr__(self, "image_format", str(self.image_format).upper())
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int):
            raise ValueError(f"jpeg_quality must be a whole number, got {self.jpeg_quality!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be between 1 and 100, got {self.jpeg_quality}")

    @classmethod
    def of(
        cls, config: ClientConfig | None = None, env: Mapping[str, str] | None = None, **options: object
    ) -> ClientConfig:
        """The settings a client runs with: `config` when given, else the FIRM_* variables of `env` (the
        process's by default) under the options given (None: not given). A config and options together is
        an error, not a silent choice.

        >>> ClientConfig.of(base_urls="http://a:1", chunk_size=None, env={}).base_urls
        ('http://a:1',)
        """
        given = {name: value for name, value in options.items() if value is not None}
        if config is None:
            return cls.from_env(env, **given)
        if given:
            raise ValueError(f"pass a config or options ({', '.join(given)}), not both")
        return config

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ClientConfig:
        """Settings from FIRM_* variables; keyword arguments win over them."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        urls = env.get("FIRM_URLS") or env.get("FIRM_URL")
        if urls:
            values["base_urls"] = _split(urls)
        if env.get("FIRM_API_KEY"):
            values["api_key"] = env["FIRM_API_KEY"]
        numbers = (("timeout_s", float), ("chunk_size", int), ("max_in_flight", int), ("jpeg_quality", int))
        for name, cast in numbers:
            if text := env.get(f"FIRM_{name.upper()}"):
                try:
                    values[name] = cast(text)
                except ValueError:
                    raise ValueError(f"FIRM_{name.upper()} must be a number, got {text!r}") from None
        if env.get("FIRM_IMAGE_FORMAT"):
            values["image_format"] = env["FIRM_IMAGE_FORMAT"]
        if env.get("FIRM_STRICT"):
            values["strict"] = env["FIRM_STRICT"].lower() in ("1", "true", "yes")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("base_urls"), str):
            values["base_urls"] = _split(values["base_urls"])  # type: ignore[arg-type]
        elif isinstance(values.get("base_urls"), Sequence):
            values["base_urls"] = tuple(values["base_urls"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def _split(urls: str) -> tuple[str, ...]:
    return tuple(u.strip().rstrip("/") for u in urls.split(",") if u.strip())
