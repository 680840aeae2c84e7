"""Round-trip notebooks through a plain-text form that is easy to edit.

    python tools/nbsrc.py dump nbs/00_core.ipynb > /tmp/core.txt    # notebook -> text
    python tools/nbsrc.py build /tmp/core.txt nbs/00_core.ipynb     # text -> notebook

The text form: a line `#%% md` starts a Markdown cell, a line `#%%` starts a code cell; an
optional `id=...` after it keeps the cell's id (nbdev 3 writes ids into the exported modules).
The notebook stays the source of truth; the text form is scratch, never committed.
Outputs are dropped on build (run `nbdev-clean` after), as nbdev-clean would.
"""
import sys
from pathlib import Path

import nbformat


def text_to_nb(text: str) -> nbformat.NotebookNode:
    "Parse the `#%%` text form into a notebook."
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    kind, cid, lines = None, None, []

    def flush():
        if kind is None: return
        src = "\n".join(lines).strip("\n")
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if cid: cell.id = cid
        nb.cells.append(cell)

    for line in text.splitlines():
        if line.startswith("#%%"):
            flush()
            words = line[3:].split()
            kind = "md" if "md" in words else "code"
            cid = next((w[3:] for w in words if w.startswith("id=")), None)
            lines = []
        else: lines.append(line)
    flush()
    return nb


def nb_to_text(nb) -> str:
    "Render a notebook in the `#%%` text form."
    out = []
    for c in nb.cells:
        out.append(("#%% md" if c.cell_type == "markdown" else "#%%") + (f" id={c.id}" if c.get("id") else ""))
        out.append(c.source)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "dump": sys.stdout.write(nb_to_text(nbformat.read(args[0], as_version=4)))
    elif cmd == "build":
        nbformat.write(text_to_nb(Path(args[0]).read_text()), args[1])
    else: sys.exit(f"unknown command {cmd!r}: use dump or build")
