"""The deployment files (Dockerfile, deploy/) agree with the server they deploy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from prometheus_client.metrics import MetricWrapperBase

from server.metrics import Metrics
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "firm.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "firm.yml"

# Series names as they appear in queries: the server's metrics all start with firm_.
_SERIES = re.compile(r"\bfirm_[a-z0-9_]+")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
# What prometheus_client appends to a metric's name in the series it exports.
_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _firm() -> dict:
    return _compose()["services"]["firm"]


def _exported_series() -> dict[str, set[str]]:
    """Every series name the server exports, mapped to the labels it carries.

    Read from the collectors themselves: a labelled metric with no samples yet still shows up in
    `collect()`, but prints nothing in the exposition text.
    """
    metrics = Metrics()
    # Label names are not part of a collected family without samples; the metric objects hold them.
    wrappers = [w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)]
    labels = {w._name: set(w._labelnames) for w in wrappers}
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in _SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = labels[family.name] | extra
    return series


def _dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


# --- compose ----------------------------------------------------------------------------------


def test_compose_reserves_gpus_for_the_server():
    devices = _firm()["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert len(gpu) == 1, devices
    assert "count" in gpu[0] or "device_ids" in gpu[0], gpu[0]


def test_compose_health_checks_readiness():
    check = _firm()["healthcheck"]
    test = check["test"] if isinstance(check["test"], str) else " ".join(check["test"])
    assert "http://127.0.0.1:8000/readyz" in test
    # Loading the critics takes minutes: the check must allow for it.
    assert re.fullmatch(r"\d+m", check["start_period"]) and int(check["start_period"][:-1]) >= 5


def test_compose_keeps_the_model_cache_and_restarts():
    firm = _firm()
    volume, _, target = firm["volumes"][0].partition(":")
    assert target.split(":")[0] == "/models"  # HF_HOME and VLLM_CACHE_ROOT live there (see the Dockerfile)
    assert volume in _compose()["volumes"], "the model cache must be a named volume"
    assert firm["restart"] == "unless-stopped"
    assert "ipc" in firm or "shm_size" in firm, "vLLM needs more shared memory than Docker's 64 MB"


def test_the_container_environment_is_one_the_server_accepts():
    """The image listens on 0.0.0.0; with the keys compose requires, the settings validate, and without them not."""
    from pydantic import ValidationError

    from server.settings import Settings

    image_env = dict(item.split("=", 1) for ins, rest in _instructions() if ins == "ENV" for item in rest.split())
    host = image_env["FIRM_HOST"]
    assert "FIRM_API_KEYS" in _firm()["environment"]
    Settings(host=host, api_keys="trainer:0123456789abcdef")
    with pytest.raises(ValidationError, match="without API keys"):
        Settings(host=host)


def test_compose_environment_matches_the_server_settings():
    env = _firm()["environment"]
    assert "HF_TOKEN" in env and env["HF_TOKEN"] is None  # passed through, never written here
    # The defaults written in the compose file are the server's own.
    for name in ("edit_model", "gen_model", "engine"):
        default = re.fullmatch(r"\$\{FIRM_\w+:-(.+)\}", env[f"FIRM_{name.upper()}"])
        assert default, env[f"FIRM_{name.upper()}"]
        assert default.group(1) == Settings.model_fields[name].default, name
    assert _firm()["ports"][0].rsplit(":", 1)[1] == "8000"  # the port the image listens on


def test_compose_grafana_is_optional():
    services = _compose()["services"]
    assert services["grafana"]["profiles"] == ["grafana"]
    assert "profiles" not in services["firm"] and "profiles" not in services["prometheus"]


# --- metrics ----------------------------------------------------------------------------------


def test_exported_series_are_derived_from_the_registry():
    series = _exported_series()
    assert {"firm_requests_total", "firm_queue_depth", "firm_judge_score_bucket"} <= series.keys()
    assert "firm_requests" not in series and "firm_queue_depth_total" not in series
    assert series["firm_request_seconds_bucket"] == {"route", "le"}


def test_dashboard_queries_use_exported_series_and_labels():
    series = _exported_series()
    queries = _dashboard_queries()
    used = {name for q in queries for name in _SERIES.findall(q)}
    assert used, "the dashboard queries no firm_ series"
    assert used <= series.keys(), f"not exported by the server: {sorted(used - series.keys())}"
    for query in queries:
        known = set().union(*(series[name] for name in _SERIES.findall(query)))
        for group in _BY.findall(query):
            grouped = {label.strip() for label in group.split(",") if label.strip()}
            assert grouped <= known, f"{query}: no such label {sorted(grouped - known)}"


def test_dashboard_covers_the_server_metrics():
    used = {name for q in _dashboard_queries() for name in _SERIES.findall(q)}
    for family in Metrics().registry.collect():
        assert used & {family.name + s for s in _SUFFIXES[family.type]}, f"no panel shows {family.name}"


def test_dashboard_uses_the_provisioned_datasource():
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for item in (panel, *panel["targets"]):
            assert item["datasource"]["uid"] == uid, panel["title"]
    # Grafana reads the dashboards from where compose mounts them.
    path = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1] for v in _compose()["services"]["grafana"]["volumes"]}
    assert path in mounts


def test_prometheus_scrapes_the_server():
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "firm"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["firm:8000"]  # the compose service and the port the container listens on
    assert "firm" in _compose()["services"]
    used = set(_SERIES.findall(PROMETHEUS.read_text()))
    assert used <= _exported_series().keys(), sorted(used - _exported_series().keys())


def test_alert_rules_watch_parse_failures_drift_unchanged_edits_and_saturation():
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    series = _exported_series()
    watched = {name for rule in rules for name in _SERIES.findall(rule["expr"])}
    assert watched <= series.keys(), sorted(watched - series.keys())
    for needed in ("firm_items_total", "firm_canary_drift", "firm_unchanged_items_total"):
        assert needed in watched, needed
    # parse failures as a share of items (an item counts once, however many judge answers it has)
    assert any('firm_items_total{outcome="parse_error"}' in rule["expr"] for rule in rules)
    assert "firm_max_score_share" in watched  # saturation
    for rule in rules:
        known = set().union(*(series[name] for name in _SERIES.findall(rule["expr"])))
        for group in _BY.findall(rule["expr"]):
            assert {label.strip() for label in group.split(",")} <= known, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
    # Prometheus loads the file from where compose mounts it
    loaded = yaml.safe_load(PROMETHEUS.read_text())["rule_files"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in _compose()["services"]["prometheus"]["volumes"]}
    assert mounts["./prometheus/alerts.yml"] in loaded


# --- Dockerfile -------------------------------------------------------------------------------


def _instructions(dockerfile: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(ins.upper(), rest) for ins, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")]


def test_dockerfile_base_is_the_pinned_vllm():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    [vllm] = [Requirement(r) for r in extra if Requirement(r).name == "vllm"]
    [base] = [rest for ins, rest in _instructions() if ins == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "vllm/vllm-openai"
    assert tag.startswith("v") and Version(tag[1:]) in vllm.specifier, f"{tag} is outside {vllm.specifier}"


def test_dockerfile_runs_firm_serve_unprivileged_and_checks_readiness():
    instructions = _instructions()
    users = [rest for ins, rest in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [health] = [rest for ins, rest in instructions if ins == "HEALTHCHECK"]
    assert "/readyz" in health
    [entrypoint] = [rest for ins, rest in instructions if ins == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["firm-serve"]
    env = " ".join(rest for ins, rest in instructions if ins == "ENV")
    assert "FIRM_HOST=0.0.0.0" in env.split()
    assert re.search(r"\bHF_HOME=/models\b", env)
    assert any(ins == "VOLUME" and "/models" in rest for ins, rest in instructions)
    assert ("EXPOSE", "8000") in instructions


def test_dockerfile_keeps_the_verified_release_prompts_outside_the_volume():
    """The image pulls the critics' prompts at build time into a folder of its own, outside /models (a
    volume or an emptyDir mounted there would hide them), and the server reads them from there."""
    for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "ray" / "Dockerfile"):
        instructions = _instructions(dockerfile)
        [pull] = [rest for ins, rest in instructions if ins == "RUN" and "firm-serve prompts pull" in rest]
        folder = pull.split("--to ")[1].split()[0]
        assert not folder.startswith("/models")
        env = " ".join(rest for ins, rest in instructions if ins == "ENV")
        assert f"FIRM_PROMPT_SOURCE={folder}" in env.split(), dockerfile


# --- docker compose ---------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    candidates = (["docker", "compose"], ["docker-compose"])
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")

    def config(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "-f", str(COMPOSE), *extra, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "FIRM_API_KEYS"} | env,
        )

    for extra in ([], ["--profile", "grafana"]):
        done = config(*extra, FIRM_API_KEYS="trainer:0123456789abcdef")
        assert done.returncode == 0, done.stderr
    # the server listens beyond loopback in the container: without keys the stack does not start
    done = config()
    assert done.returncode != 0 and "FIRM_API_KEYS" in done.stderr
