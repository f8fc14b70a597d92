"""How the critics are laid out on a Ray cluster: replicas, resources, autoscaling, health checks.

The critics themselves are configured exactly as for `firm-serve`: `server` holds `Settings`
fields by name, and every replica also reads the `FIRM_*` environment variables (set them in the
Serve config's `runtime_env`). The layout settings here come from the builder's arguments or
from `FIRM_RAY_*` environment variables.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.tasks import TASKS
from server.settings import SWITCHED_OFF, Settings


class MissingApiKeys(RuntimeError):
    """API keys are required (the proxy is reachable from the network) but the ingress has none."""


def served_settings(server: dict[str, Any], require_api_keys: bool) -> Settings:
    """The `firm-serve` settings the ingress serves HTTP with, its keys checked before it starts.

    Ray's proxy, not the ingress, binds the address, so the server's own "no keys on a public
    address" check never runs here; `require_api_keys` stands in for it.
    """
    settings = Settings(**server)
    if require_api_keys and not settings.key_ring().enabled:
        raise MissingApiKeys(
            "require_api_keys is set but the ingress has no API keys: set FIRM_API_KEYS on every node "
            "(or in the application's runtime_env), or api_key_file under server"
        )
    return settings


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIRM_RAY_", extra="forbid")

    server: dict[str, Any] = Field(
        default_factory=dict,
        description="firm-serve settings for every replica, by field name (e.g. engine, each critic's model, "
        "max_batch_size); FIRM_* environment variables of the replicas apply too.",
    )
    split: bool = Field(
        False,
        description="Run each critic as its own deployment (its own replicas and GPUs) instead of every critic "
        "in every replica; the ingress routes each task's /v1/<task>/* to its deployment.",
    )
    num_gpus: float = Field(1.0, ge=0.0, description="GPUs each critic replica reserves (0 on CPU-only clusters).")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs each critic replica reserves.")
    min_replicas: int = Field(1, ge=0, description="Fewest critic replicas per deployment (0 lets it scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most critic replicas per deployment.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Critic replicas started at deploy time (default: min_replicas)."
    )
    target_ongoing_requests: float = Field(
        16.0,
        gt=0.0,
        description="Autoscaling target: requests in flight or queued per critic replica. Keep it well above "
        "one GRPO round per replica, since the engine batches concurrent requests together.",
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Most requests a critic replica takes at once; more wait in the ingress. Ray's default (5) "
        "would starve the micro-batcher.",
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Most requests each ingress replica holds waiting for a critic replica with a free slot; "
        "past it the client gets 429 with Retry-After instead of an ever longer wait. -1: no bound.",
    )
    upscale_delay_s: float = Field(30.0, ge=0.0, description="How long load must stay high before adding a replica.")
    downscale_delay_s: float = Field(
        600.0, ge=0.0, description="How long load must stay low before removing a replica."
    )
    health_check_period_s: float = Field(
        10.0, gt=0.0, description="How often Ray asks each critic replica whether its engines are healthy."
    )
    health_check_timeout_s: float = Field(30.0, gt=0.0, description="How long one health check may take.")
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0.0, description="How long a stopping replica may finish its requests in flight."
    )
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the path-routing ingress (light, CPU only).")
    ingress_num_cpus: float = Field(0.25, ge=0.0, description="CPUs each ingress replica reserves.")
    forward_attempts: int = Field(
        2,
        ge=1,
        le=10,
        description="Attempts the ingress makes when a critic replica dies under a request (scoring is idempotent); "
        "after the last one the client gets 503 with Retry-After.",
    )
    require_api_keys: bool = Field(
        False,
        description="An ingress replica without API keys (FIRM_API_KEYS, or api_keys / api_key_file under server) "
        "refuses to start. Set it whenever the Serve proxy listens on more than loopback.",
    )
    metrics_push_interval_s: float = Field(
        5.0,
        gt=0.0,
        description="How often each replica pushes its metrics page to the board that /metrics reads.",
    )

    @model_validator(mode="after")
    def _check(self) -> RaySettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests is -1 (no bound) or at least 1")
        self.critic_settings()  # fail at deploy time, not in every replica
        return self

    def critic_overrides(self, task: str | None = None) -> dict[str, Any]:
        """The server settings a replica is given: every critic, or only `task`'s when the critics are split.

        Only what was given travels, with the recent-items ring off unless asked for (the ingress serves no
        watch page); each replica reads its own FIRM_* environment for the rest.
        """
        # no watch page behind the ingress, so no recent-items ring: its signals and metrics still count
        overrides = {"watch_samples": 0, **self.server}
        if task is not None:
            overrides.update({f"{other}_model": SWITCHED_OFF for other in TASKS if other != task})
        return overrides

    def critic_settings(self, task: str | None = None) -> Settings:
        return Settings(**self.critic_overrides(task))

    def critic_tasks(self) -> list[str]:
        """The critics that get a deployment of their own when split (the ones switched on)."""
        return list(self.critic_settings().enabled_tasks())

    def autoscaling(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
