"""Write README.md from nbs/index.ipynb: Markdown cells as they are, code cells as Python blocks.

Cells marked `#| hide` (or `#| include: false`) are left out, and other `#|` directive lines are dropped, as
nbdev does. Links are written for the notebook's folder (they are what the docs site checks); in the README,
which sits at the repository root, relative links get `nbs/` resolved away: `../BENCHMARKS.md` becomes
`BENCHMARKS.md`, `guide_will_it_help.ipynb` becomes `nbs/guide_will_it_help.ipynb` (GitHub shows notebooks).
Run by `make readme`; `make test` fails when README.md differs from what this writes.
"""
import os
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
_re_link = re.compile(r'(!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\()([^)\s]+)(\))')


def _from_root(m) -> str:
    "A link written relative to nbs/, rewritten relative to the repository root"
    target = m.group(2)
    if re.match(r'^[a-z][a-z0-9+.-]*:', target) or target.startswith(('#', '/')): return m.group(0)
    path, sep, anchor = target.partition('#')
    rel = os.path.relpath(os.path.normpath(NBS / path), ROOT).replace(os.sep, '/')
    return f"{m.group(1)}{rel}{sep}{anchor}{m.group(3)}"


def fix_links(md: str) -> str:
    "Rewrite relative links outside code (fenced blocks and inline code are left alone)"
    out, fence = [], False
    for line in md.split('\n'):
        if line.lstrip().startswith('```'): fence = not fence
        elif not fence:
            code = [m.span() for m in re.finditer(r'`[^`]*`', line)]  # a link starting inside code is text
            line = _re_link.sub(lambda m: m.group(0) if any(a <= m.start() < b for a, b in code) else _from_root(m), line)
        out.append(line)
    return '\n'.join(out)


def cell_md(cell) -> str | None:
    "Markdown for one cell, or None when the cell is hidden."
    lines = cell.source.splitlines()
    directives = [l[2:].strip() for l in lines if l.startswith("#|")]
    if any(d.split()[:1] == ["hide"] or re.match(r'include:\s*false', d) for d in directives): return None
    body = "\n".join(l for l in lines if not l.startswith("#|")).strip()
    if not body: return None
    return fix_links(body) if cell.cell_type == "markdown" else f"```python\n{body}\n```"


def main():
    nb = nbformat.read(NBS / "index.ipynb", as_version=4)
    parts = [md for c in nb.cells if (md := cell_md(c)) is not None]
    note = "<!-- generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file -->"
    (ROOT / "README.md").write_text(note + "\n\n" + "\n\n".join(parts) + "\n")


if __name__ == "__main__": main()
