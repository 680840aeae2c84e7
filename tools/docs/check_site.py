"""Check a built static site: every local link, image and script resolves, and every `#anchor` exists.

MkDocs' `--strict` validation covers the links written in Markdown; this covers what it does not see
(raw HTML in pages and notebook outputs, the theme's navigation) by reading the built HTML itself.

    python tools/docs/check_site.py site/
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.refs = set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ('id', 'name') if tag == 'a' else ('id',):
            if a.get(k): self.ids.add(a[k])
        for k in ('href', 'src'):
            if a.get(k) is not None and not (tag == 'link' and a.get('rel') in ('canonical', 'alternate')):
                self.refs.append((tag, k, a[k]))


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding='utf-8', errors='replace'))
    return p


def check_site(site: Path) -> list[str]:
    "Problems found in the HTML pages under `site`: unresolved local links and anchors"
    site = site.resolve()
    pages = {p: _parse(p) for p in site.rglob('*.html')}
    problems = []
    for page, parsed in pages.items():
        if page.name == '404.html' and page.parent == site: continue  # MkDocs links it from site_url on purpose
        for tag, attr, ref in parsed.refs:
            u = urlsplit(ref)
            if u.scheme or u.netloc or ref.startswith(('mailto:', 'data:', 'javascript:')): continue
            if not u.path:
                target = page
            else:
                target = (page.parent / unquote(u.path)).resolve() if not u.path.startswith('/') else None
                if target is None:
                    problems.append(f'{page.relative_to(site)}: <{tag} {attr}="{ref}">: site-absolute path (breaks under a base URL)')
                    continue
                if target.is_dir() or u.path.endswith('/'): target = target / 'index.html'
            if not target.exists():
                problems.append(f'{page.relative_to(site)}: <{tag} {attr}="{ref}">: {target} does not exist')
                continue
            if u.fragment and target.suffix == '.html':
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(u.fragment) not in ids:
                    problems.append(f'{page.relative_to(site)}: <{tag} {attr}="{ref}">: no id "{u.fragment}" in '
                                    f'{target.relative_to(site)}')
    return problems


def main(argv=None):
    site = Path((argv or sys.argv[1:] or ['site'])[0])
    if not (site / 'index.html').exists(): sys.exit(f'{site}/index.html not found: build the site first (make docs)')
    problems = check_site(site)
    for p in problems: print(p, file=sys.stderr)
    if problems: sys.exit(f'FAILED: {len(problems)} broken links or anchors in {site}')
    print(f'ok: every local link and anchor in {site} resolves ({len(list(site.rglob("*.html")))} pages)')


if __name__ == '__main__': main()
