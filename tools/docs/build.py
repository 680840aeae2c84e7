"""Build the documentation site from the notebooks, without Quarto: what `make docs` runs.

    python tools/docs/build.py            # _proc/ -> _mkdocs/ -> site/, strict, then check links
    python tools/docs/build.py --force    # re-run nbdev's processing of every notebook (no cache)

1. nbdev's own `proc_nbs` (the step `nbdev-docs` runs before Quarto) writes processed notebooks to `_proc/`:
   `show_doc` signatures with docments and source links, hidden and `#| export` cells removed, doc links.
   It caches: a notebook is processed again only when it (or pyproject.toml) changed.
2. `nb2md.py` writes each processed notebook as a Markdown page to `_mkdocs/`, with the hand-written
   files of `docs/` (styles, any `.md` page) beside them.
3. `mkdocs build --strict -f docs/mkdocs.yml` writes `site/`; any warning (a missing page, file or
   anchor) fails it.
4. `check_site.py` reads the built HTML and fails on any local link or anchor that does not resolve.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from check_site import check_site  # noqa: E402
from nb2md import DocsError, PageWriter, Site, heading_ids, resolve_autolinks  # noqa: E402

OUT, SITE, HAND = ROOT / '_mkdocs', ROOT / 'site', ROOT / 'docs'


def _site() -> Site:
    from nbdev.config import get_config
    from mkdocs_hooks import repo_url
    cfg = get_config()
    doc_url = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/')
    return Site(root=ROOT, nbs=cfg.nbs_path, out=OUT, repo_url=repo_url(), branch=cfg.get('branch', 'main'),
                doc_url=doc_url)


def json_str(line: str) -> str:
    "How a line of cell source appears inside the .ipynb JSON"
    import json
    return json.dumps(line)[1:-1]


def proc(force: bool = False, n_workers: int | None = None) -> Path:
    "Run nbdev's `proc_nbs` over nbs/ into _proc/ (as `nbdev-proc-nbs` does, without its Quarto set-up)"
    from fastcore.basics import defaults
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    # nbdev's cache knows only the notebook's own date; `#| exec_doc` cells read the world (a committed plot,
    # this machine), so their notebooks are processed every time
    cfg = get_config()
    for nb in cfg.nbs_path.rglob('*.ipynb'):
        if re.search(r'#\|\s*exec_doc', nb.read_text(encoding='utf-8')):
            (cfg.config_path / '_proc' / nb.relative_to(cfg.nbs_path)).unlink(missing_ok=True)
    try: return proc_nbs(force=force, n_workers=n_workers or defaults.cpus)
    except Exception as e:
        lines = [l.strip() for l in str(e).splitlines()[1:-1] if l.strip() and not l.startswith('#|')]
        where = [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob('nbs/*.ipynb'))
                 if lines and all(l in p.read_text() for l in (json_str(lines[0]), json_str(lines[-1])))]
        sys.exit(f"FAILED: nbdev could not process the notebooks for the docs"
                 f"{' (in ' + ', '.join(where) + ')' if where else ''}:\n{e}\n\n"
                 "To render API docs nbdev runs, in a fresh kernel, only the cells that import, export or call "
                 "show_doc (as nbdev-docs does). A cell that imports AND uses names made in other cells fails "
                 "there: move its imports into the notebook's imports cell.")


def source_notebooks(site: Site) -> list[Path]:
    "The notebooks nbdev documents (the same glob as `proc_nbs`)"
    from nbdev.doclinks import nbglob
    return [Path(p) for p in nbglob(site.nbs)]


def write_pages(site: Site, cache: Path) -> list[str]:
    "Write one Markdown page per processed notebook, plus the hand-written files, to `site.out`"
    if site.out.exists(): shutil.rmtree(site.out)
    site.out.mkdir(parents=True)
    writers = []
    for nb in source_notebooks(site):
        proc_nb = cache / nb.relative_to(site.nbs)
        if not proc_nb.exists(): sys.exit(f'FAILED: {proc_nb} missing: nbdev did not process {nb}')
        w = PageWriter(site, nb, proc_nb)
        if w.name in site.pages.values():
            sys.exit(f'FAILED: two notebooks make the page {w.name}: rename one (nbdev drops the numeric prefix)')
        site.pages[nb.stem] = site.pages[Path(w.name).stem] = w.name
        writers.append(w)
    texts = {}
    for w in writers:
        try: texts[w.name] = w.render()
        except DocsError as e: sys.exit(f'FAILED: {e}')
    anchors = {name: heading_ids(t) for name, t in texts.items()}
    dropped = []
    for name, text in texts.items():
        text, d = resolve_autolinks(text, anchors)
        dropped += d
        (site.out / name).write_text(text, encoding='utf-8')
    if dropped:
        print(f"note: {len(dropped)} of nbdev's links point to names no page documents (private or without "
              f"show_doc), left as plain code: {', '.join(sorted(set(dropped)))}")
    for f in HAND.rglob('*'):
        if f.is_file() and f.name != 'mkdocs.yml':
            dest = site.out / f.relative_to(HAND)
            if dest.exists(): sys.exit(f'FAILED: docs/{f.relative_to(HAND)} and a notebook both make {dest.name}')
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    return [w.name for w in writers]


def mkdocs_build():
    "`mkdocs build --strict`: warnings (missing pages, files, anchors) fail the build"
    cmd = [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--clean', '-f', str(HAND / 'mkdocs.yml')]
    # NO_MKDOCS_2_WARNING: Material's banner about its end of life (May 2027; Zensical reads this mkdocs.yml) on every build
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    if r.returncode: sys.exit(f'FAILED: {" ".join(cmd[2:])} exited {r.returncode} (see its warnings above)')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--force', action='store_true', help="process every notebook again (ignore nbdev's cache)")
    ap.add_argument('--n-workers', type=int, default=None, help='processes for nbdev (default: all cores)')
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    t0 = time.time()
    site = _site()
    cache = proc(args.force, args.n_workers)
    t1 = time.time()
    pages = write_pages(site, cache)
    mkdocs_build()
    problems = check_site(SITE)
    for p in problems: print(p, file=sys.stderr)
    if problems: sys.exit(f'FAILED: {len(problems)} broken local links or anchors in the built site')
    print(f'ok: docs site built in {SITE.relative_to(ROOT)}/ from {len(pages)} notebooks ({", ".join(pages)}); '
          f'nbdev processing {t1 - t0:.0f}s, total {time.time() - t0:.0f}s; links and anchors resolve')


if __name__ == '__main__': main()
