"""MkDocs hooks of the documentation site (see `hooks:` in mkdocs.yml; not a page).

The Markdown pages are also read on GitHub, where a relative link such as
`[hookspecs](../ev3core/hookspecs.py)` opens the source file. The site has no such file, so a
link that leaves `docs/` and names a file that exists in the repository is rendered as the
file's path instead; any other broken link is still an error under `mkdocs build --strict`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"\[([^\]\n]+)\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")


def _source_link(match: re.Match[str]) -> str:
    text, path = match.group(1), match.group(2)
    if not (ROOT / path).exists():
        return match.group(0)  # not a repository file: MkDocs validates it as usual
    if text.strip("`") == path:
        return f"`{path}`"
    return f"{text} (`{path}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return _LINK.sub(_source_link, markdown)
