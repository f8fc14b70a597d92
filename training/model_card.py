"""The model card written next to a fine-tuned critic: README.md for people, firm_training.json for tools."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from server.settings import SWITCHED_OFF
from server.tasks import SERVER_TASKS

_CARD = """\
---
base_model: {base_model}
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- firm
- reward-model
- critic
---

# FIRM critic fine-tuned from {base_model}

A reward critic for image editing and text-to-image generation, fine-tuned with `firm-train`
on {examples} records curated with `firm-curate`. It answers the prompts of the FIRM reward
server's judges in their formats and is served with one of:

```bash
{serve_commands}
```

Without `none`, the server also loads its default critic for each other task.

## Training

| setting | value |
| --- | --- |
| method | {method} |
| learning rate | {learning_rate} ({lr_scheduler}, warm-up {warmup_ratio}) |
| epochs | {epochs} (max steps {max_steps}) |
| batch | {batch_size} x {grad_accum} accumulated |
| records | {records} |
| left out (answer over {max_answer_tokens} tokens) | {left_out} |
| loss on {measured_on} records, before -> after | {before} -> {after} |

The loss covers the critic's answers only. All settings and the logged losses are in
`firm_training.json`.
"""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def serve_commands(output: str) -> str:
    """One firm-serve command per task, serving the critic for that task and no critic for the others.

    >>> print(serve_commands("critic"))
    firm-serve --edit-model critic --gen-model none    # a critic of image editing
    firm-serve --gen-model critic --edit-model none    # a critic of text-to-image generation
    """
    lines = []
    for name, task in SERVER_TASKS.items():
        others = " ".join(f"--{other}-model {SWITCHED_OFF}" for other in SERVER_TASKS if other != name)
        lines.append(f"firm-serve --{name}-model {output} {others}    # a critic of {task.spec.title}")
    return "\n".join(lines)


def write_model_card(folder: Path, report: dict[str, Any]) -> None:
    settings, loss = report["settings"], report["loss"]
    text = _CARD.format(
        base_model=report["base_model"],
        examples=report["examples"],
        serve_commands=serve_commands(shlex.quote(str(folder))),
        method=report["method"],
        records=", ".join(Path(p).name for p in report["records"]),
        measured_on=loss["measured_on"],
        before=_fmt(loss["before"]),
        after=_fmt(loss["after"]),
        left_out=len(report["left_out"]["answer_over_max_tokens"]),
        **{
            k: settings[k]
            for k in (
                "learning_rate",
                "lr_scheduler",
                "warmup_ratio",
                "epochs",
                "max_steps",
                "batch_size",
                "grad_accum",
                "max_answer_tokens",
            )
        },
    )
    (folder / "README.md").write_text(text, encoding="utf-8")
    (folder / "firm_training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
