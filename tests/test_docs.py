"""Every Python code block of README.md and docs/*.md runs here, or says why it cannot (issue 32).

A block is marked by an HTML comment on the line before its fence, invisible on GitHub and on the docs site:

    <!-- example: fast -->                 runs in the fast suite (tiny configs, no offline asset)
    <!-- example: real -->                 runs as a `real` test (the offline checkpoints of REAL_ASSETS.md)
    <!-- example: not run: the reason -->  not run; the reason is shown in the test report

Each block runs alone, in a fresh namespace, with a temporary folder as the working directory: a block is a
complete program a user can paste.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
MARK = re.compile(r"^<!-- example: (fast|real|not run: (?P<why>\S.*?)) -->$")


def python_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """``(line of the fence, marker line or None, code)`` for every ```python block of ``path``."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            mark = (lines[i - 1].strip() if i else None) if end is not None else "(a fence never closed)"
            end = len(lines) if end is None else end
            out.append((i + 1, mark, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return out


BLOCKS = [(p, line, mark, code) for p in PAGES for line, mark, code in python_blocks(p)]


def _params(kind: str) -> list:
    marks = [pytest.mark.real] if kind == "real" else []
    return [pytest.param(p, line, code, id=f"{p.relative_to(ROOT)}:{line}", marks=marks)
            for p, line, mark, code in BLOCKS if mark == f"<!-- example: {kind} -->"]


def test_every_python_block_is_marked():
    unmarked = [f"{p.relative_to(ROOT)}:{line} {mark or ''}" for p, line, mark, _ in BLOCKS
                if not (mark and MARK.match(mark))]
    assert not unmarked, ("put <!-- example: fast -->, <!-- example: real --> or <!-- example: not run: REASON --> "
                          f"on the line before each ```python fence: {unmarked}")
    assert BLOCKS, "no Python example found: README.md and docs/*.md should show how to use hf-ext"


def test_readme_stays_a_ten_minute_read():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250): move details to the technique's page in docs/"


def _run(path: Path, line: int, code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("path, line, code", _params("fast"))
def test_fast_example(path, line, code, tmp_path, monkeypatch):
    _run(path, line, code, tmp_path, monkeypatch)


@pytest.mark.parametrize("path, line, code", _params("real"))
def test_real_example(path, line, code, tmp_path, monkeypatch):
    _run(path, line, code, tmp_path, monkeypatch)
