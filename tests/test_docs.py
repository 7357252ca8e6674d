"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace).

Examples are user code, so they run with JAX's default ("standard") dtype promotion rather than
the strict promotion the rest of the suite uses for ev3core itself (optax's Adam, for one, is
not strict-promotion clean: it raises a float to an int32 step count).
"""

import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_docs_have_examples():
    assert sum(len(BLOCK.findall(f.read_text())) for f in FILES) >= 5


@pytest.mark.slow  # a few of the files train several engines
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_code_examples_run(path, monkeypatch, tmp_path):
    blocks = BLOCK.findall(path.read_text())
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(blocks):
        try:
            with jax.numpy_dtype_promotion("standard"):
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is what matters
            raise AssertionError(f"{path.name} block {i} failed: {exc!r}\n{code}") from exc
