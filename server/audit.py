"""The audit log: one JSON line per scored item, rotated by size. No images, no keys."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from clients.protocol import ModelRef


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, backups: int = 5) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._logger = logging.getLogger(f"firm.audit.{path}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.handlers[:] = [handler]

    def record(
        self, route: str, request_id: str | None, model: ModelRef, results: Sequence[BaseModel], latency_s: float
    ) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for result in results:
            line = {
                "time": stamp,
                "route": route,
                "request_id": request_id,
                "model": model.name,
                "revision": model.revision,
                "latency_ms": round(1000 * latency_s, 1),
                **result.model_dump(exclude_none=True),
            }
            self._logger.info(json.dumps(line, ensure_ascii=False))

    def close(self) -> None:
        for handler in self._logger.handlers:
            handler.close()
