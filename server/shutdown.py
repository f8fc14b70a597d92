"""Graceful shutdown: on SIGTERM stop taking work, finish what was accepted, then exit.

The first SIGTERM (or Ctrl-C) makes readiness false at once and new scoring requests get 503
with Retry-After, so load balancers and clients move on; requests in flight finish, for at most
`--drain-timeout-s`; then uvicorn shuts down as usual. A second signal exits at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.service = app.state.service
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None

    @classmethod
    def serve_app(cls, app: FastAPI, settings: Settings) -> None:
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False, log_config=None
        )
        cls(config, app, settings.drain_timeout_s).run()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.service.begin_drain()
            log.info("signal %d: draining (up to %.0f s), a second signal exits at once", sig, self.drain_timeout_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.service.in_flight == 0 or waited > self.drain_timeout_s:
                if self.service.in_flight:
                    log.warning("drain timeout: %d requests still in flight", self.service.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)
