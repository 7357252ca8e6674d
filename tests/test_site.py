"""The documentation site builds with `mkdocs build --strict` and has the pages it should.

Strict mode turns every warning into an error: a broken link between pages, a page missing
from the nav, an object `::: ev3core.X` that does not exist, a docstring mkdocstrings cannot
render. The API page must document every public name of `ev3core`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ev3core
from ev3core import hookspecs

# `make test` runs `pytest -n 2 --dist loadgroup`: this module's tests run
# in one worker, which builds the documentation site (`site`) once for all of them.
pytestmark = pytest.mark.xdist_group("site")


ROOT = Path(__file__).resolve().parents[1]


def _nav_pages(nav):
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}"
    return out


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_page_is_in_the_nav_and_built(site):
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    nav = list(_nav_pages(config["nav"]))
    on_disk = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == on_disk, "add new docs/*.md pages to the nav in mkdocs.yml"
    for page in nav:
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), page


def test_api_page_documents_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    missing = [n for n in ev3core.__all__ if f'id="ev3core.{n}"' not in html]
    assert not missing, f"add `::: ev3core.<name>` for {missing} to docs/api.md"
    text = _text(html)
    # docstrings are rendered, not just headings
    assert "One EV3 iteration as one compiled program" in text  # Engine
    assert "one JSON line per step" in text  # JsonlLogger
    for hook in hookspecs._all_hook_names():
        assert f'id="ev3core.hookspecs.{hook}"' in html, hook


def test_hooks_page_has_the_lifecycle_diagram_and_every_hook(site):
    html = (site / "hooks" / "index.html").read_text()
    assert 'class="mermaid"' in html and "sequenceDiagram" in html
    text = _text(html)
    for hook in hookspecs._all_hook_names():
        assert hook in text, hook


def test_observability_page_and_source_links(site):
    text = _text((site / "observability" / "index.html").read_text())
    for needle in (
        "--no-progress",
        "--log-jsonl",
        "EV3_TENSORBOARD_LOGDIR",
        "EV3_TRACE_PLUGINS",
        "ev3 plugins --json",
    ):
        assert needle in text, needle
    # a link from a page into the source tree becomes the file's path on the site
    for md in sorted((ROOT / "docs").glob("*.md")):
        found = re.search(r"\]\(\.\./(ev3core/[\w/]+\.py)\)", md.read_text())
        if found:
            page = "" if md.stem == "index" else f"{md.stem}/"
            built = _text((site / page / "index.html").read_text())
            assert f"../{found.group(1)}" not in built and found.group(1) in built
