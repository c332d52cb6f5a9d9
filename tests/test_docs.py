"""Every Python example of the documentation site (docs/*.md) runs as written."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# bad_input.md (made by tests/test_errors.py) shows calls that fail on purpose
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text() and p.name != "bad_input.md")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_site_has_examples():
    assert {p.name for p in PAGES} >= {"index.md", "tour.md", "coming-from.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_run(page):
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for code in _blocks(page.read_text()):
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
