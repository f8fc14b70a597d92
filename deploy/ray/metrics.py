"""Every replica's Prometheus series, labelled with the replica, in one scrape.

Each replica (the critics, which count their scoring, and the ingress, which counts the HTTP
requests) labels its own series with `deployment` and `replica` and pushes its page to a small
board deployment every few seconds. `/metrics` through the ingress answers with the board's
pages merged into one valid page, so one scrape of the Serve endpoint sees the whole application
(each replica at most one push interval old). A replica that stops pushing (killed, scaled down)
drops off the board after a few intervals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)


def _labelled(family: Metric, labels: Mapping[str, str]) -> Metric:
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
    return copy


def _merged(families: Iterable[Metric]) -> list[Metric]:
    """Families of the same name from several replicas as one family (one HELP and TYPE line each)."""
    by_name: dict[str, Metric] = {}
    for family in families:
        if family.name not in by_name:
            by_name[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        by_name[family.name].samples.extend(family.samples)
    return list(by_name.values())


class _Labelled:
    def __init__(self, registry: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.registry, self.labels = registry, dict(labels)

    def collect(self) -> list[Metric]:
        return [_labelled(family, self.labels) for family in self.registry.collect()]


def labelled_registry(registry: CollectorRegistry, labels: Mapping[str, str]) -> CollectorRegistry:
    """A registry that shows `registry`'s series with `labels` added to each."""
    outer = CollectorRegistry(auto_describe=False)
    outer.register(_Labelled(registry, labels))
    return outer


def merge_pages(pages: Iterable[str]) -> str:
    """Several replicas' pages as one valid page: each family once, with every replica's samples."""
    families = _merged(family for page in pages for family in text_string_to_metric_families(page))

    class _Families:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry).decode("utf-8")


async def share_metrics(board: DeploymentHandle, replica: str, registry: CollectorRegistry, interval_s: float) -> None:
    """Push `registry`'s page to the board every interval, until cancelled; the board being down
    (restarting) must not stop the replica's work.

    The first failed push is logged with its traceback, the following ones in one line each, so an
    outage of minutes does not fill the log with the same traceback every few seconds.
    """
    failing = False
    while True:
        try:
            await board.push.remote(replica, generate_latest(registry).decode("utf-8"))
        except Exception as exc:  # logged; the next push retries
            if failing:
                log.warning("still cannot share metrics with the board: %s: %s", type(exc).__name__, exc)
            else:
                log.warning("could not share metrics with the board; retrying", exc_info=True)
            failing = True
        else:
            if failing:
                log.info("sharing metrics with the board again")
            failing = False
        await asyncio.sleep(interval_s)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class MetricsBoard:
    """The latest metrics page of every live replica: the one place all scrapes read, so each replica's
    counters only ever move forward between scrapes, whoever answers them."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.pages: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, page: str) -> None:
        self.pages[replica] = (time.monotonic(), page)

    def merged(self) -> str:
        """Every live replica's series; a replica that stopped pushing (killed, scaled down) is left out."""
        now = time.monotonic()
        self.pages = {name: entry for name, entry in self.pages.items() if now - entry[0] <= self.stale_after_s}
        return merge_pages(page for _, page in self.pages.values())
