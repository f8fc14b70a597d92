"""`firm-score watch URL`: the watch page's signals as a table in a terminal, refreshed in place.

For a remote box without a browser: each critic's dimensions (histogram of the last window and the
baseline, share of maximum scores, score/expected disagreement), its failure rates, unchanged and
flagged edits, and the canaries, read from the server's `/watch/data`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

import httpx

CLEAR = "\x1b[H\x1b[2J"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bars(histogram: list[int]) -> str:
    """A histogram as one block character per score, scaled to its largest count."""
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(histogram) or 1
    return "".join(blocks[round(8 * n / top)] for n in histogram)


def render(data: dict[str, Any]) -> str:
    """The table, as text."""
    lines = []
    states = ", ".join(f"{task} {state}" for task, state in data.get("states", {}).items())
    lines.append(f"FIRM watch   {time.strftime('%H:%M:%S', time.localtime(data['now']))}   {states}")
    canaries = data.get("canaries")
    if canaries is None:
        lines.append("canaries: off")
    else:
        for task, report in canaries["tasks"].items():
            lines.append(f"canaries {task}: {report['status'].upper() if report['status'] != 'clean' else 'clean'}")
            for item, found in report.get("differences", {}).items():
                lines.append(f"  DRIFT {item}: {'; '.join(found)}")
    header = f"{'task':<6} {'dimension':<22} {'window 1-5':<11} {'baseline':<9} {'max':>6} {'max base':>8} {'|s-e|':>6}"
    for task, view in data["tasks"].items():
        window, baseline = view["window"], view["baseline"]
        lines.append("")
        lines.append(
            f"{task}: {window['items']} items in {data['window_s']:g} s, reward {_num(window['reward_mean'])}"
            f" ± {_num(window['reward_std'])}, parse failures {_pct(window['parse_failure_rate'])}, engine errors "
            f"{_pct(window['engine_error_rate'])}, zero-spread groups {_pct(window['zero_spread_rate'])}"
        )
        if view["edits"]:
            flagged = window["flagged"]
            lines.append(f"  unchanged edits {window['unchanged']}, flagged (unchanged, high score) {flagged}")
        lines.append("  " + header)
        for name in view["dimensions"]:
            last, base = window["dimensions"][name], baseline["dimensions"][name]
            lines.append(
                f"  {task:<6} {name:<22} {_bars(last['histogram']):<11} {_bars(base['histogram']):<9} "
                f"{_pct(last['max_share']):>6} {_pct(base['max_share']):>8} {_num(last['disagreement']):>6}"
            )
    flagged = [s for s in data.get("samples", []) if s["flagged"]]
    if flagged:
        lines.append("")
        lines.append("flagged items (newest first):")
        lines.extend(f"  {s['task']} {s['item']}: {s['text']}" for s in flagged[:10])
    return "\n".join(lines)


def watch(url: str, key: str | None, every: float, once: bool, out: TextIO = sys.stdout) -> int:
    """Print the table every `every` seconds until interrupted (once with `once`)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        while True:
            response = client.get("/watch/data", params={"limit": 50})
            if response.status_code != 200:
                answer = f"{response.status_code}: {response.text}"
                print(f"firm-score watch: {url}/watch/data answered {answer}", file=sys.stderr)
                return 2
            text = render(response.json())
            if once:
                print(text, file=out)
                return 0
            print(CLEAR + text, file=out, flush=True)
            time.sleep(every)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("watch", help="show the server's watch signals in the terminal, refreshed")
    parser.add_argument("watch_url", metavar="URL", help="the server's base URL")
    parser.add_argument("--admin-key", help="the server's admin key, when it has keys (default: FIRM_ADMIN_KEY)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print the table once and exit")


def main(args: Any) -> int:
    key = args.admin_key or os.environ.get("FIRM_ADMIN_KEY")
    try:
        return watch(args.watch_url, key, args.every, args.once)
    except KeyboardInterrupt:
        return 0
    except httpx.HTTPError as exc:
        print(f"firm-score watch: cannot reach {args.watch_url}: {exc}", file=sys.stderr)
        return 2
