"""Every Python code block on the docs site is executed by the test suite.

Notebook code cells are run by `nbdev-test` (`#| slow` and `#| cuda` cells with `--flags`), so here:
- a notebook code cell may not opt out with `#| eval: false`: it would be shown but never run;
- ```python blocks written inside Markdown (notebook Markdown cells, hand-written pages in docs/) are not
  cells, so they are run here. A block in a notebook runs as a reader would run it: after the notebook's own
  cells (those `nbdev-test` runs), in the same kernel, so it may use what the page defined (`dls`, `model`).
  A hand-written page's blocks run in order in a fresh namespace.
"""
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_re_block = re.compile(r'^```+\s*python[^\n]*\n(.*?)^```+\s*$', re.M | re.S)


def notebooks():
    return sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb') if not any(s.startswith(('_', '.')) for s in p.parts[-2:]))


def markdown_blocks(text: str) -> list[str]:
    "The ```python blocks of Markdown `text`"
    return [m.group(1) for m in _re_block.finditer(text)]


def pages_with_blocks():
    for nb_path in notebooks():
        nb = nbformat.read(nb_path, as_version=4)
        blocks = [b for c in nb.cells if c.cell_type == 'markdown' for b in markdown_blocks(c.source)]
        if blocks: yield pytest.param(nb_path, blocks, id=nb_path.name)
    for md in sorted((ROOT / 'docs').rglob('*.md')):
        if blocks := markdown_blocks(md.read_text()): yield pytest.param(md, blocks, id=str(md.relative_to(ROOT)))


def run_after_notebook(nb_path: Path, blocks: list[str]):
    "Run the cells `nbdev-test` runs in `nb_path`, then `blocks`, in one kernel, from the notebook's folder"
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from fastcore.nbio import mk_cell, read_nb
    from nbdev.test import _skip_cell
    raw = read_nb(nb_path)
    skip = _skip_cell(raw, get_config().get('tst_flags', '').split())
    raw.cells = [c for c in raw.cells if not skip(c)] + [mk_cell(b) for b in blocks]
    nb = NBProcessor(nb=raw, rm_directives=False, process=True).nb
    k = CaptureShell(nb_path)
    with working_directory(nb_path.parent):
        try: k.run_all(nb, exc_stop=True)
        except Exception as e:
            raise AssertionError(f'a ```python block written in the Markdown of {nb_path.name} fails when run after '
                                 f'the notebook\'s cells (write it as a code cell, or make it runnable):\n'
                                 f'{k.prettytb(fname=nb_path) or e}') from None


def test_markdown_blocks_are_found():
    assert markdown_blocks('x\n```python\na = 1\n```\n```sh\nmake\n```\n````python\nb = 2\n````\n') == ['a = 1\n', 'b = 2\n']


def test_no_notebook_cell_is_shown_but_never_run():
    "A cell left out of the site (exported, hidden, `include: false`) may skip evaluation; a shown one may not"
    def shown(src): return not re.search(r'^#\|\s*(export|exporti|hide|include:\s*false)\s*$', src, re.M)
    skipped = [f'{p.relative_to(ROOT)} cell {i}' for p in notebooks()
               for i, c in enumerate(nbformat.read(p, as_version=4).cells)
               if c.cell_type == 'code' and re.search(r'^#\|\s*eval:\s*false', c.source, re.M) and shown(c.source)]
    assert not skipped, f'cells with `#| eval: false` are on the site but never tested: {skipped}'


@pytest.mark.parametrize('page, blocks', list(pages_with_blocks()) or
                         [pytest.param(None, [], marks=pytest.mark.skip(reason='no ```python block in any Markdown text'))])
def test_markdown_python_blocks_run(page, blocks, monkeypatch):
    if page.suffix == '.ipynb': return run_after_notebook(page, blocks)
    monkeypatch.chdir(ROOT / 'nbs')
    ns = {'__name__': '__docs_example__'}
    for b in blocks: exec(compile(b, f'<{page.name}>', 'exec'), ns)
