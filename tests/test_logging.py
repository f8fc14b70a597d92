"""Every line a `firm-serve` process writes is one object in the server's log format, and none comes twice:
the libraries it runs (transformers, huggingface_hub, uvicorn) log through the server's one handler."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support import b64, free_port, running_server

FIELDS = {"time", "level", "logger", "message"}
# Made talkative, so that their lines are there to check: transformers logs each file it loads at info.
CHATTY = {"TRANSFORMERS_VERBOSITY": "info", "HF_HUB_VERBOSITY": "info", "HF_HUB_OFFLINE": "1"}
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: (?P<message>.*)")

# Each library logs once after the server's set-up, the way it does in a running server; vLLM's
# logger is stood in for by its name, as vLLM itself is not installed everywhere.
EMIT = """
import logging, sys, warnings
from server.logs import configure_logging
configure_logging("info", sys.argv[1])
import huggingface_hub.utils.logging as hub_logging
import transformers.utils.logging as transformers_logging
hub_logging.get_logger("huggingface_hub.file_download").warning("hub says once")
transformers_logging.get_logger("transformers.modeling_utils").warning("transformers says once")
logging.getLogger("vllm.engine").warning("vllm says once")
logging.getLogger("uvicorn.error").info("uvicorn says once")
logging.getLogger("httpx").info("httpx says once")
warnings.warn("python says once")
"""
SAID = ["hub says once", "transformers says once", "vllm says once", "uvicorn says once", "httpx says once"]


@pytest.mark.parametrize("style", ["json", "text"])
def test_each_library_logs_through_the_one_handler_once(style: str) -> None:
    done = subprocess.run([sys.executable, "-c", EMIT, style], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not done.stdout
    messages = []
    for line in done.stderr.splitlines():
        if style == "json":
            record = json.loads(line)
            messages.append(record["message"])
        elif matched := TEXT_LINE.fullmatch(line):
            messages.append(matched["message"])
        else:  # a message of several lines (the warning's): its continuation
            assert messages, f"not in the server's text format: {line!r}"
            messages[-1] += "\n" + line
    for said in SAID:
        assert messages.count(said) == 1, (said, done.stderr)
    assert sum("python says once" in m for m in messages) == 1, done.stderr


def test_every_line_is_one_json_object_and_none_comes_twice(tiny_checkpoint: Path, cache_dir: Path) -> None:
    with running_server(cache_dir, "--log-format", "json", env=CHATTY) as url:
        item = {"source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
        assert httpx.post(f"{url}/v1/edit/score", json={"items": [item]}, timeout=120).status_code == 200
        log_path = cache_dir / f"server-{url.rsplit(':', 1)[1]}.log"
    assert_one_json_object_a_line(log_path.read_text())


def assert_one_json_object_a_line(text: str, loggers_seen: frozenset[str] = frozenset({"transformers"})) -> None:
    """Every line a JSON object in the server's format, the libraries' among them (`loggers_seen` with the
    server's own), and none of the server's or huggingface_hub's lines twice."""
    assert "\r" not in text, "a progress bar was drawn around the handler"
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict) and record.keys() >= FIELDS, line
        records.append(record)
    loggers = {record["logger"].split(".")[0] for record in records}
    assert {"firm-serve", "uvicorn", *loggers_seen} <= loggers, loggers
    # transformers logs some of its own lines more than once (a config read twice): the server's must be once
    ours = Counter(r["message"] for r in records if not r["logger"].startswith("transformers"))
    assert not [m for m, n in ours.items() if n > 1], ours


def test_a_critic_that_cannot_be_had_is_told_once_in_the_log_format(tmp_path: Path) -> None:
    """Offline, with a checkpoint folder that is not there: the server says so before any library tries to
    load it, each line once and in JSON, naming the folder and what to do."""
    cmd = [sys.executable, "-m", "server.cli", "--cache-dir", str(tmp_path), "--port", str(free_port())]
    cmd += ["--edit-model", str(tmp_path / "missing"), "--gen-model", "none", "--prompts", "own"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*cmd, "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CHATTY}
        )
        try:
            deadline = time.monotonic() + 120
            while '"level": "error"' not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"no error logged:\n{log_path.read_text()[-4000:]}"
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    text = log_path.read_text()
    assert_one_json_object_a_line(text, frozenset({"server"}))
    errors = [json.loads(line)["message"] for line in text.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and str(tmp_path / "missing") in errors[0] and "--tiny" in errors[0], errors
