"""Every ``python`` code block of the README and docs/*.md runs, in a fresh interpreter, as
written. A block preceded by a ``<!-- signature ... -->`` line only shows a signature and is not
run; one preceded by ``<!-- requires: mod1 mod2 -->`` is skipped (with the reason) when one of
those modules is not installed, e.g. a "before" example written for Dask or Ray (with
``TOKENGATE_REQUIRE_DOC_DEPS=1``, as in .ci/run, it fails instead)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from _support import run_child

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


REQUIRES = re.compile(r"<!-- requires: (?P<mods>[\w. ]+) -->")


def _blocks() -> list[tuple[str, str, list[str]]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = "\n" + doc.read_text()
        for n, m in enumerate(FENCE.finditer(text), 1):
            if m["before"].startswith("<!-- signature"):
                continue
            req = REQUIRES.match(m["before"])
            mods = req["mods"].split() if req else []
            out.append((f"{doc.relative_to(ROOT)}#{n}", m["code"], mods))
    return out


BLOCKS = _blocks()


def test_the_docs_have_runnable_examples():
    assert any(name.startswith("docs/api.md") for name, _, _ in BLOCKS)


@pytest.mark.parametrize(("name", "code", "mods"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_doc_example_runs(tmp_path, name, code, mods):
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"{name} needs {', '.join(missing)}: pip install {' '.join(missing)}"
        if os.environ.get("TOKENGATE_REQUIRE_DOC_DEPS"):  # set by .ci/run, which installs them
            pytest.fail(reason)
        pytest.skip(reason)
    rc, out, err = run_child(tmp_path, code, timeout=60)
    assert rc == 0, f"{name} failed:\n{out}\n{err}"
