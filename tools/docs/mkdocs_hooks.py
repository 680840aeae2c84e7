"""MkDocs hooks for the site built from the notebooks (loaded by `hooks:` in docs/mkdocs.yml).

- headings get Pandoc's ids (`Learner.fit` -> `learner.fit`), the ids nbdev's doc links use;
- the navigation is made from the pages present: Home, then guides (front matter `order`), then one API
  page per module in notebook order; so a new notebook appears without editing the config;
- the repository link comes from pyproject's `[project.urls] Repository`, and each page's "edit" button
  opens its notebook, the page's source.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

try: import tomllib
except ImportError: import tomli as tomllib  # Python 3.10

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nb2md import pandoc_slug  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_re_fm = re.compile(r'^---\s*\n(.*?)\n---\s*\n', re.S)


def _meta(p: Path) -> dict:
    m = _re_fm.match(p.read_text(encoding='utf-8'))
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def _pyproject() -> dict: return tomllib.loads((ROOT / 'pyproject.toml').read_text())
def repo_url() -> str: return _pyproject()['project']['urls']['Repository']
def branch() -> str: return _pyproject().get('tool', {}).get('nbdev', {}).get('branch', 'main')


def make_nav(docs_dir: Path) -> list:
    "Home, Guides (by `order`, then title), API reference (by source notebook)"
    pages = {p.relative_to(docs_dir).as_posix(): _meta(p) for p in sorted(docs_dir.rglob('*.md'))}
    guides = [(m.get('order', 99), m.get('title', k), k) for k, m in pages.items()
              if k != 'index.md' and m.get('section', 'guide') == 'guide']
    api = [(m.get('source_nb', k), k) for k, m in pages.items() if k != 'index.md' and m.get('section') == 'api']
    nav = [{'Home': 'index.md'}] if 'index.md' in pages else []
    if guides: nav.append({'Guides': [k for *_, k in sorted(guides)]})
    if api: nav.append({'API reference': [k for _, k in sorted(api)]})
    return nav


def on_config(config, **kwargs):
    toc = config.mdx_configs.setdefault('toc', {})
    toc['slugify'] = pandoc_slug
    if not config.nav: config.nav = make_nav(Path(config.docs_dir))
    if not config.repo_url: config.repo_url = repo_url()
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    nb = page.meta.get('source_nb')
    if nb: page.edit_url = f"{config.repo_url.rstrip('/')}/blob/{branch()}/{nb}"
    return markdown
