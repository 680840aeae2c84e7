"""Write README.md from nbs/index.ipynb: Markdown cells as they are, code cells as Python blocks.

Cells marked `#| hide` are left out, and other `#|` directive lines are dropped, as nbdev does.
Run by `make readme`; `make test` fails when README.md differs from what this writes.
"""
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def cell_md(cell) -> str | None:
    "Markdown for one cell, or None when the cell is hidden."
    lines = cell.source.splitlines()
    directives = [l for l in lines if l.startswith("#|")]
    if any(d.split()[1:2] == ["hide"] for d in directives): return None
    body = "\n".join(l for l in lines if not l.startswith("#|")).strip()
    if not body: return None
    return body if cell.cell_type == "markdown" else f"```python\n{body}\n```"


def main():
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    parts = [md for c in nb.cells if (md := cell_md(c)) is not None]
    note = "<!-- generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file -->"
    (ROOT / "README.md").write_text(note + "\n\n" + "\n\n".join(parts) + "\n")


if __name__ == "__main__": main()
