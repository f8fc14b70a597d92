"""`firm-rollout`: one rollout worker that trains a generator against the FIRM reward server, with
Flow-GRPO or the FIRM release's DiffusionNFT (`--algorithm`).

Run one per GPU under torchrun; every worker calls the same reward service.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from foundation.flags import describe_errors, parse_settings, settings_parser
from rl_workers.settings import RolloutSettings
from rl_workers.tasks import ROLLOUT_TASKS

_EPILOG = """\
examples:
  firm-rollout --task gen --prompts prompts.txt --reward-url http://127.0.0.1:8000
  firm-rollout --task edit --prompts edits.jsonl --group-size 16 --groups-per-step 4
  firm-rollout --algorithm nft --task gen --prompts prompts.txt --groups-per-step 6   # the paper's recipe
  torchrun --nproc-per-node 8 -m rl_workers.cli --task gen --prompts prompts.txt   # one worker per GPU
  firm-rollout --tiny --task gen --prompts prompts.txt --resolution 64 --group-size 4 --sample-steps 2

Prompt files: gen takes one prompt per line; edit takes JSONL lines {"source": "img.png", "instruction": "..."}
(paths relative to the file). Every flag is also an environment variable: --group-size 8 is FIRM_RL_GROUP_SIZE=8.
The reward server's URL(s), API key and retries follow the client's FIRM_URLS / FIRM_API_KEY settings.
Figures go to OUTPUT_DIR/metrics.jsonl; LoRA checkpoints to OUTPUT_DIR/checkpoint-N.
"""


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        RolloutSettings,
        prog="firm-rollout",
        description="GRPO or NFT (--algorithm) on "
        + " or ".join(f"{t.generator_title} ({name}, {t.spec.reward} reward)" for name, t in ROLLOUT_TASKS.items())
        + ", with rewards from a running firm-serve.",
        epilog=_EPILOG,
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings: RolloutSettings = parse_settings(build_parser(), RolloutSettings, argv)
    except ValidationError as exc:
        sys.exit(f"firm-rollout: invalid settings:\n{describe_errors(exc)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per reward call drowns the figures
    from rl_workers.run import run
    from rl_workers.worker import StoppedWithoutRewards

    try:
        run(settings)
    except (ValueError, OSError, StoppedWithoutRewards) as exc:
        sys.exit(f"firm-rollout: {exc}")


if __name__ == "__main__":  # pragma: no cover
    main()
