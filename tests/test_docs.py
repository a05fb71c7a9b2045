"""Every ``python`` code block of the README and docs/*.md runs, in a fresh interpreter, as
written (a block preceded by a ``<!-- signature ... -->`` line only shows a signature)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from _support import run_child

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = "\n" + doc.read_text()
        for n, m in enumerate(FENCE.finditer(text), 1):
            if m["before"].startswith("<!-- signature"):
                continue
            out.append((f"{doc.relative_to(ROOT)}#{n}", m["code"]))
    return out


BLOCKS = _blocks()


def test_the_docs_have_runnable_examples():
    assert any(name.startswith("docs/api.md") for name, _ in BLOCKS)


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_doc_example_runs(tmp_path, name, code):
    rc, out, err = run_child(tmp_path, code, timeout=60)
    assert rc == 0, f"{name} failed:\n{out}\n{err}"
