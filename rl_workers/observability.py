"""Per-step figures: a JSONL log always, TensorBoard and Weights & Biases when installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Writes one JSON object per training step to `metrics.jsonl` (main rank only)."""

    def __init__(
        self, output_dir: Path, *, tensorboard: bool, wandb_project: str | None, config: dict[str, Any]
    ) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tensorboard: Any = None
        self._wandb: Any = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                log.warning("--wandb-project is set but wandb is not installed: logging to %s only", self.path)
            else:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config)

    def write(self, step: int, figures: dict[str, float]) -> None:
        """One line per step; an unknown figure (NaN: nothing trained, nothing scored) is written as null."""
        known = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in figures.items()}
        self._file.write(json.dumps({"step": step, **known}, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in figures.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(figures, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
