"""The docs' tables of flags, metrics and error codes, written from the code that defines them.

Each table sits in a docs page between `<!-- generated:NAME -->` and `<!-- end generated -->`, so a
setting, a metric or an error code added to the code reaches the docs by running this script, and
a table left stale fails the test suite (`--check`, run by tests/test_docs.py) instead of misleading a reader:

    python docs/gen_tables.py           # rewrite the tables in place
    python docs/gen_tables.py --check   # exit 1 when a checked-in table differs from the code
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python docs/gen_tables.py`, the project's packages sit one level up
    sys.path.insert(0, str(ROOT))

from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

from clients.protocol import ItemErrorCode  # noqa: E402
from foundation.flags import flag  # noqa: E402
from server.engines import vllm as vllm_engine  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.settings import Settings  # noqa: E402

DOCS = Path(__file__).resolve().parent
END = "<!-- end generated -->"

# What each error code tells the caller. The statuses and the codes themselves are read from the code; only
# the explanation lives here, and a code without one (or one the code no longer sends) stops the script.
REQUEST_ERRORS: dict[str, str] = {
    "invalid_json": "The body is not JSON (or not UTF-8 text); the message says why, at which line and column.",
    "invalid_request": "The body does not match the schema (or is nested too deeply to parse); the message names "
    "the fields.",
    "body_too_large": "The body is over `--max-body-bytes`, checked from `Content-Length` and while it streams in.",
    "image_too_large": "An image is over `--max-image-bytes` or `--max-image-pixels` (a decompression bomb is "
    "refused from its header); the message names the field.",
    "too_large": "More items or candidates than `--max-items-per-request`.",
    "model_disabled": "The route's model is switched off (`--gen-model none`, `--edit-model none`).",
    "unauthorized": "No API key, or a key the server does not know; the response carries `WWW-Authenticate`.",
    "forbidden": "A scoring key on an admin route.",
    "admin_off": "An admin route on a server started without `--admin-key`.",
    "unsupported": "An admin route the engine cannot serve (an engine that cannot sleep).",
    "overloaded": "The model's queue is full (`--max-queue`); `Retry-After` says when to come back.",
    "not_ready": "The model is loading, asleep or failed to load, or the server is shutting down; `Retry-After` "
    "is set.",
    "deadline_exceeded": "The request took longer than `--request-timeout-s`; its engine work was cancelled.",
    "client_disconnected": "The client disconnected before its answer, and its work was cancelled. No one reads "
    "this response: the status shows only in the logs and in `firm_requests_total`.",
    "not_found": "No such route.",
    "method_not_allowed": "The route exists, but not for this HTTP method.",
    "internal_error": "An unexpected fault; the server log has the details, the response never a traceback.",
}
ITEM_ERRORS: dict[str, str] = {
    "invalid_image": "The bytes are not a decodable PNG, JPEG or WebP, or the image's aspect ratio is over "
    "200:1; `field` names the image.",
    "parse_error": "The judge's answer held no valid 1-5 score. The message says why, and says when the answer "
    "was cut off at its judge's token budget. An answer cut off after it already holds a rating is scored, as "
    "the release scores it.",
    "no_score_probabilities": "`score_mode: expected` was asked for, but the engine gave no probabilities at the "
    "score.",
    "engine_error": "The engine failed on this item's call.",
    "deadline": "The request's own `timeout_s` passed before the item's judge calls finished; their work was "
    "dropped, and the other items of the request are answered.",
    "request_failed": "Set by the client, never the server: the request that carried the item failed after its "
    "retries; the message names the cause (`HTTP 413 too_large: ...`).",
}
_CODE = re.compile(r"^[a-z][a-z_]*[a-z]$")


def cell(text: str) -> str:
    """Text safe in a Markdown table cell: no column breaks, no HTML tags, no stray emphasis."""
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*")):
        text = text.replace(raw, escaped)
    return text


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# flags


def _default(name: str, field: Any) -> str:
    """A default as a reader would type it; the home directory is written `~` so the page is the same on every
    machine."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        value = "~" + text[len(home) :] if text == home or text.startswith(home + "/") else text
    text = f"`{value}`" if str(value) else '`""`'
    if name.endswith("_bytes") and isinstance(value, int) and value % (1 << 20) == 0:
        text += f" ({value >> 20} MiB)"
    return text


def _choices(annotation: object) -> tuple[object, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    literals = [a for a in get_args(annotation) if get_origin(a) is Literal]
    return get_args(literals[0]) if len(literals) == 1 else ()


def flags_table(settings: type[Any] = Settings) -> str:
    """One row per field of the server's settings, whatever fields it has when this runs."""
    prefix = settings.model_config.get("env_prefix", "")
    rows = []
    for name, field in settings.model_fields.items():
        switch = f"`{flag(name)}` / `--no-{name.replace('_', '-')}`" if field.annotation is bool else f"`{flag(name)}`"
        meaning = cell(field.description or "")
        choices = _choices(field.annotation)
        if choices:
            meaning += " One of " + ", ".join(f"`{c}`" for c in choices) + "."
        rows.append([switch, f"`{prefix}{name.upper()}`", _default(name, field), meaning])
    return table(["flag", "environment variable", "default", "meaning"], rows)


# metrics


def _series(holder: object) -> list[MetricWrapperBase]:
    """The series an object holds as attributes, in the order it made them."""
    return [value for value in vars(holder).values() if isinstance(value, MetricWrapperBase)]


def _metric_rows(series: Iterable[MetricWrapperBase]) -> list[list[str]]:
    rows = []
    for wrapper in series:
        family = wrapper.describe()[0]
        name = family.name + ("_total" if family.type == "counter" else "")  # the name /metrics shows
        labels = ", ".join(f"`{label}`" for label in wrapper._labelnames) or "none"  # no public accessor
        rows.append([f"`{name}`", family.type, labels, cell(family.documentation)])
    return rows


def metrics_table() -> str:
    """Every series of `server.metrics.Metrics`, as `/metrics` names it."""
    return table(["metric", "type", "labels", "what it counts or measures"], _metric_rows(_series(Metrics())))


def vllm_metrics_table() -> str:
    """The series the vllm engine adds to the same registry (made without importing vllm)."""
    registry = Metrics().registry
    rows = _metric_rows(_series(vllm_engine._series(registry)))
    return table(["metric", "type", "labels", "what it counts or measures"], rows)


# error codes


def _pair(status: ast.expr, code: ast.expr) -> tuple[int, str] | None:
    if (
        isinstance(status, ast.Constant)
        and type(status.value) is int
        and 400 <= status.value < 600
        and isinstance(code, ast.Constant)
        and isinstance(code.value, str)
        and _CODE.match(code.value)
    ):
        return status.value, code.value
    return None


def sent_errors(package: Path = ROOT / "server") -> set[tuple[int, str]]:
    """Every (status, code) pair the server's code writes out: `error_response(413, "body_too_large", ...)`,
    `status, code = 404, "model_disabled"`, refusals returned as `(401, "unauthorized", message)`, and
    `{413: "body_too_large"}` maps from an HTTP status to its code."""
    found: set[tuple[int, str]] = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs: list[tuple[ast.expr, ast.expr]] = []
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                pairs.append((node.args[0], node.args[1]))
            elif isinstance(node, ast.Tuple) and len(node.elts) >= 2:
                pairs.append((node.elts[0], node.elts[1]))
            elif isinstance(node, ast.Dict):
                pairs += [(k, v) for k, v in zip(node.keys, node.values, strict=True) if k is not None]
            found |= {pair for status, code in pairs if (pair := _pair(status, code))}
    return found


def _explained(codes: Iterable[str], meanings: dict[str, str], where: str) -> None:
    codes = set(codes)
    if missing := sorted(codes - meanings.keys()):
        raise SystemExit(f"error codes without a meaning in docs/gen_tables.py ({where}): {', '.join(missing)}")
    if gone := sorted(meanings.keys() - codes):
        raise SystemExit(f"docs/gen_tables.py explains codes the code no longer sends ({where}): {', '.join(gone)}")


def errors_table() -> str:
    """Request errors (their HTTP status) and then item errors (inside a 200 answer, `reward: null`)."""
    sent = sent_errors()
    _explained((code for _, code in sent), REQUEST_ERRORS, "REQUEST_ERRORS")
    _explained(get_args(ItemErrorCode), ITEM_ERRORS, "ITEM_ERRORS")
    statuses: dict[str, list[int]] = {}
    for status, code in sorted(sent):
        statuses.setdefault(code, []).append(status)
    order = sorted(statuses, key=lambda code: (statuses[code], code))
    rows = [[", ".join(map(str, statuses[code])), f"`{code}`", REQUEST_ERRORS[code]] for code in order]
    rows += [["200, per item", f"`{code}`", ITEM_ERRORS[code]] for code in get_args(ItemErrorCode)]
    return table(["status", "code", "meaning"], rows)


# the pages


@dataclasses.dataclass(frozen=True)
class Generated:
    name: str
    page: str
    render: Callable[[], str]


def hub_failures_table() -> str:
    """Why a critic cannot be had, and what the server tells its user to do, as `/readyz` says it."""
    from server.checkpoints.hub import Cause, remedies

    rows = [
        [
            f"`{cause.name.lower()}`",
            cause.value,
            "yes" if cause.transient else "no",
            "; ".join(remedies(cause, "`--<task>-model`")),
        ]
        for cause in Cause
    ]
    return table(["cause", "said as", "tried again", "what to do (in the message)"], rows)


TABLES = (
    Generated("flags", "operations.md", flags_table),
    Generated("hub-failures", "operations.md", hub_failures_table),
    Generated("metrics", "operations.md", metrics_table),
    Generated("vllm-metrics", "operations.md", vllm_metrics_table),
    Generated("errors", "api.md", errors_table),
)


def splice(text: str, name: str, body: str) -> str:
    """`text` with the block between the markers of `name` replaced by `body`."""
    start = f"<!-- generated:{name} -->"
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"expected one '{start}' ... '{END}' block, found {len(pattern.findall(text))}")
    return pattern.sub(lambda _: f"{start}\n{body}\n{END}", text)


def render_pages(docs: Path) -> dict[Path, tuple[str, str]]:
    """Each page holding a table: its text now, and its text with every table written from the code."""
    pages: dict[Path, tuple[str, str]] = {}
    for generated in TABLES:
        path = docs / generated.page
        old, new = pages.get(path, (path.read_text(encoding="utf-8"),) * 2)
        pages[path] = (old, splice(new, generated.name, generated.render()))
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1, writing nothing, when a table is stale")
    parser.add_argument("--docs-dir", type=Path, default=DOCS, help="the docs folder (default: this script's)")
    args = parser.parse_args(argv)
    stale = []
    for path, (old, new) in render_pages(args.docs_dir).items():
        if old == new:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
    if args.check and stale:
        names = ", ".join(str(p) for p in stale)
        print(f"stale generated tables in {names}; run `python docs/gen_tables.py`", file=sys.stderr)
        return 1
    for path in stale:
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
