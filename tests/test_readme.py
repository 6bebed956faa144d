"""Every ```python block of README.md runs as written.

Each block runs on its own (a fresh namespace, CPU tensors), so it must define its inputs:
small random tensors. A block that needs what a test cannot have (a model from the Hub, a
trainer's config, a cluster) is marked by an HTML comment, invisible on the rendered page, on
the line just before its fence:

    <!-- readme-test: compile-only (the reason) -->

and is then only compiled. A ``readme-test`` comment line of another form, or one that no
```python fence follows, is an error, so a typo cannot skip a block silently.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
COMPILE_ONLY = re.compile(r"compile-only \(.+\)")


def python_blocks(text: str):
    """(first line number, source, marker or None) of each ```python block."""
    lines = text.splitlines()
    blocks, start, marker = [], None, None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number + 1
            previous = lines[number - 2] if number > 1 else ""
            found = MARKER.fullmatch(previous.strip())
            marker = found.group(1) if found else None
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start - 1 : number - 1]), marker))
            start = None
    assert start is None, f"README.md:{start}: a ```python block is never closed"
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_runnable_blocks():
    assert sum(marker is None for _, _, marker in BLOCKS) >= 3


def test_markers_are_known_and_precede_a_block():
    text = README.read_text().splitlines()
    for number, line in enumerate(text, 1):
        found = MARKER.fullmatch(line.strip())
        if found is None:
            continue
        assert COMPILE_ONLY.fullmatch(found.group(1)), f"README.md:{number}: {line}"
        following = text[number].strip() if number < len(text) else ""
        assert following == "```python", f"README.md:{number}: no ```python block follows"


@pytest.mark.parametrize(
    "start, source, marker", BLOCKS, ids=[f"README.md:{start}" for start, _, _ in BLOCKS]
)
def test_block_runs(start, source, marker):
    # Line numbers in tracebacks are the README's.
    code = compile("\n" * (start - 1) + source, str(README), "exec")
    if marker is not None:
        return  # compile-only: compiled above
    exec(code, {"__name__": f"readme_block_{start}"})
