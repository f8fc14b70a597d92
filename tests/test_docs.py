"""The docs stay true to the code and build: generated tables are current, the site builds in strict
mode (no broken link or anchor, no page left out of the navigation), and the README's links land."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from server.metrics import Metrics
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_generator() -> ModuleType:
    """docs/gen_tables.py is a script, not a package module: load it from its file."""
    spec = importlib.util.spec_from_file_location("gen_tables", DOCS / "gen_tables.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as CI builds it: `mkdocs build --strict`, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_checked_in_tables_match_the_code() -> None:
    run = subprocess.run(
        [sys.executable, str(DOCS / "gen_tables.py"), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"{run.stderr}\nrun `python docs/gen_tables.py` and commit the pages"


def test_a_stale_table_fails_the_check(gen: ModuleType, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "operations.md"
    page.write_text(page.read_text().replace("`FIRM_PORT`", "`FIRM_PORT_OLD`"))
    assert gen.main(["--check", "--docs-dir", str(docs)]) == 1
    assert gen.main(["--docs-dir", str(docs)]) == 0  # rewriting brings it back
    assert "`FIRM_PORT`" in page.read_text() and "FIRM_PORT_OLD" not in page.read_text()
    assert gen.main(["--check", "--docs-dir", str(docs)]) == 0


def test_a_page_without_its_markers_is_refused(gen: ModuleType) -> None:
    with pytest.raises(SystemExit, match="generated:flags"):
        gen.splice("no table here\n", "flags", "| a |")


def test_every_setting_has_a_row_with_its_flag_and_variable(gen: ModuleType) -> None:
    rows = gen.flags_table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for name in Settings.model_fields:
        flag, env = "--" + name.replace("_", "-"), "FIRM_" + name.upper()
        assert any(f"`{flag}`" in row and f"`{env}`" in row for row in rows), name
    port = next(row for row in rows if "`--port`" in row)
    assert "`8000`" in port


def test_every_metric_is_listed_as_metrics_serves_it(gen: ModuleType) -> None:
    table = gen.metrics_table()
    exposed = {family.name for family in Metrics().registry.collect()}
    for name in exposed:
        assert re.search(rf"`{name}(_total)?`", table), name
    assert "`firm_requests_total` | counter | `route`, `status`" in table


def test_every_error_code_has_a_meaning(gen: ModuleType) -> None:
    table = gen.errors_table()
    assert "| 422 | `invalid_request` |" in table
    assert "| 429 | `overloaded` |" in table
    assert "| 200, per item | `parse_error` |" in table
    assert (404, "model_disabled") in gen.sent_errors()


def test_site_builds_strict_with_every_page(site: Path) -> None:
    for page in ("api", "rl", "operations", "training", "design", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
    assert not list(site.rglob("*.py")), "the generator script is not part of the site"


def test_readme_links_land_on_pages_and_headings(site: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#([^)\s]+))?\)", readme)
    assert links, "the README links into docs/"
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        page = Path(target).relative_to("docs").with_suffix("")
        html = site / ("index.html" if page.name == "index" else page / "index.html")
        if anchor:
            assert f'id="{anchor}"' in html.read_text(), f"{target}#{anchor}"


def test_one_page_says_where_a_critic_goes() -> None:
    """The page names every table a new critic needs an entry in, and every file it names exists."""
    page = (DOCS / "adding-a-critic.md").read_text()
    for place in ("clients/protocol.py", "clients/tasks.py", "server/tasks.py", "server/judges/__init__.py"):
        assert f"`{place}`" in page, place
    assert "`server/judges/templates/`" in page
    named = set(re.findall(r"`((?:clients|server|rl_workers|training|tests|docs)/[\w/.]+)`", page))
    assert named, "the page names no file"
    for path in named:
        assert (ROOT / path).exists(), path
    design = (DOCS / "design.md").read_text()
    assert "(adding-a-critic.md)" in design.split("## Adding a critic", 1)[1].split("\n## ", 1)[0]


def test_ci_runs_the_readme_test_command_and_the_docs_build() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[test]" && ruff check . && python -m pytest -q'
    assert command in readme and command in ci
    assert "mkdocs build --strict" in ci
