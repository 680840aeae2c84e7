"""Turn nbdev's processed notebooks (`_proc/*.ipynb`) into Markdown pages for MkDocs.

nbdev's `proc_nbs` has already done the nbdev part: front matter from `# Title` / `> summary`, `show_doc`
cells added after `#| export` cells and executed (signature, docments table, source link), hidden and
exported cells removed, `#| exports` cells folded, backticked names linked. What is left is Quarto's part,
done here: each cell becomes Markdown, Quarto cell options (`#| echo: false`, `#| output: asis`,
`#| code-fold`, `#| include: false`) are honoured, outputs are written out (images saved as files), and
links are rewritten for the static site:

- links to the hosted Quarto docs (`{doc_host}{doc_baseurl}/learner.html#learner`, what nbdev's linker
  writes) and to notebooks (`03_channelslast.ipynb#channelslast`) point to the generated page (`channelslast.md`);
- links to other files of the repository (`../tests/test_fp16.py#test_name`) point to the file in the
  repository (`{Repository}/blob/{branch}/tests/test_fp16.py#L12`): an anchor naming a Python function or
  class becomes its line, and a file or name that does not exist is an error, so a cited test must exist;
- local images are copied next to the pages.

Anchors follow Pandoc's rules (`pandoc_slug`), so nbdev's `learner.html#learner.fit` anchors work unchanged.
"""
from __future__ import annotations

import base64
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'}
_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
# `[text](target "title")` and `![alt](target)`; text may hold one level of nested brackets (`[`x`]`)
_re_link = re.compile(r'(?P<img>!?)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target><[^>]*>|[^)\s]+)(?P<title>\s+"[^"]*")?\)')
_re_callout = re.compile(r'^:::\s*\{\.callout-(?P<kind>\w+)(?P<attrs>[^}]*)\}\s*$')
_re_fm = re.compile(r'^---\s*\n(.*?)\n---\s*$', re.S)
_re_default_repr = re.compile(r'<[\w.]+( object)? at 0x[0-9a-f]+>')


AUTOLINK = 'nbdev-autolink:'  # marks, between the two passes, a link nbdev's linker wrote
_re_autolink = re.compile(r'\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\(' + AUTOLINK + r'(?P<page>[^)#\s]+)(?:#(?P<anchor>[^)\s]*))?\)')


class DocsError(Exception):
    "A page cannot be built as written (a missing link target, an unknown cell option ...)"


def pandoc_slug(value: str, separator: str = '-') -> str:
    "Heading id as Pandoc (and so Quarto and nbdev's doc links) makes it: `Learner.fit` -> `learner.fit`"
    v = unicodedata.normalize('NFKC', value)
    v = re.sub(r'[^\w\s.-]', '', v).strip().lower()
    v = re.sub(r'\s+', separator, v)
    v = re.sub(r'^[\W\d_]+', '', v)
    return v or 'section'


@dataclass
class Site:
    "What the converter needs to know about the project"
    root: Path          # the repository
    nbs: Path           # its notebooks folder
    out: Path           # where pages go (the MkDocs docs_dir)
    repo_url: str       # `[project.urls] Repository`
    branch: str         # git branch source links point to
    doc_url: str        # where nbdev thinks the docs are hosted (`{doc_host}{doc_baseurl}`)
    pages: dict[str, str] = field(default_factory=dict)   # notebook stem and page stem -> page file name

    def blob(self, rel: str, anchor: str = '') -> str:
        return f"{self.repo_url.rstrip('/')}/blob/{self.branch}/{rel}" + (f'#{anchor}' if anchor else '')


def page_name(nb_name: str, fm: dict) -> str:
    "`core.md` for `00_core.ipynb`: nbdev's `output-file` (numeric prefix dropped), as Markdown"
    out = fm.get('output-file') or re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(nb_name).stem.lower()) + '.html'
    return Path(out).with_suffix('.md').name


def read_frontmatter(nb) -> dict:
    "The YAML front matter nbdev's `FrontmatterProc` puts in the first raw cell, or {}"
    for c in nb.cells:
        if c.cell_type == 'raw' and (m := _re_fm.match(c.source.strip())): return yaml.safe_load(m.group(1)) or {}
    return {}


def split_options(src: str) -> tuple[dict, str]:
    "Split the leading `#| key: value` lines (Quarto cell options) from the code"
    opts, lines = {}, src.splitlines()
    while lines and lines[0].startswith('#|'):
        k, _, v = lines.pop(0)[2:].strip().partition(':')
        v = v.strip()
        opts[k.strip()] = {'true': True, 'false': False}.get(v.lower(), v.strip('"\''))
    return opts, '\n'.join(lines).strip('\n')


def _fence(body: str, lang: str = '') -> str:
    ticks = '````' if '```' in body else '```'
    return f'{ticks}{lang}\n{body.rstrip()}\n{ticks}'


def _indent(s: str, n: int = 4) -> str:
    return '\n'.join((' ' * n + l) if l.strip() else '' for l in s.splitlines())


class PageWriter:
    "Render one processed notebook as one Markdown page"
    def __init__(self, site: Site, src_nb: Path, proc_nb: Path):
        self.site, self.src_nb, self.proc_nb = site, src_nb, proc_nb
        self.nb = nbformat.read(proc_nb, as_version=4)
        self.fm = read_frontmatter(self.nb)
        self.name = page_name(src_nb.name, self.fm)
        self.n_img = 0

    def where(self, i: int) -> str: return f'{self.src_nb.relative_to(self.site.root)} (cell {i})'

    # links ---------------------------------------------------------------------------------------
    def link_target(self, target: str, is_img: bool, where: str) -> str:
        "Where a link of this page should point on the built site"
        t = target[1:-1] if target.startswith('<') else target
        if self.site.doc_url and t.startswith(self.site.doc_url + '/'):
            t = t[len(self.site.doc_url) + 1:]
            path, _, anchor = t.partition('#')
            # nbdev links every name in its index, also those no page documents (or pages not built): resolved,
            # or turned into plain code, by `resolve_autolinks` once every page is written
            page = self.site.pages.get(Path(path).stem, Path(path).stem + '.md')
            return AUTOLINK + page + (f'#{anchor}' if anchor else '')
        if re.match(r'^[a-z][a-z0-9+.-]*:', t) or t.startswith('#'): return t  # URL, mailto:, same-page anchor
        path, _, anchor = t.partition('#')
        src = (self.src_nb.parent / path).resolve()
        if src.suffix in ('.ipynb', '.html', '.md') and (src.stem in self.site.pages or src.parent == self.site.nbs):
            if src.stem not in self.site.pages:
                raise DocsError(f'{where}: link {target}: no page is made from `{path}`. '
                                f'Known pages: {sorted(set(self.site.pages.values()))}')
            return self.site.pages[src.stem] + (f'#{anchor}' if anchor else '')
        if not src.exists():
            raise DocsError(f'{where}: link {target}: {src} does not exist. Fix the path (relative to the notebook).')
        try: rel = src.relative_to(self.site.root).as_posix()
        except ValueError: raise DocsError(f'{where}: link {target} leaves the repository ({src}).') from None
        if is_img and src.suffix.lower() in IMAGE_SUFFIXES:
            dest = self.site.out / 'assets' / rel.replace('/', '_')
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            return f'assets/{dest.name}'
        if anchor and src.suffix == '.py' and not re.fullmatch(r'L\d+(-L\d+)?', anchor):
            anchor = f'L{py_line(src, anchor, where)}'
        return self.site.blob(rel, anchor)

    def fix_links(self, md: str, where: str) -> str:
        "Rewrite the links of Markdown text `md`, leaving code (fenced or inline) alone"
        out, fence = [], None
        for line in md.split('\n'):
            m = re.match(r'^\s*(`{3,}|~{3,})', line)
            if fence:
                if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence): fence = None
                out.append(line); continue
            if m: fence = m.group(1); out.append(line); continue
            if line.startswith('    ') and out and not out[-1].strip(): out.append(line); continue  # indented code
            code = [m.span() for m in re.finditer(r'(`+)[^`].*?\1', line)]  # inline code: links there are text

            def sub(m):
                if any(a <= m.start() < b for a, b in code): return m.group(0)
                return f"{m['img']}[{m['text']}]({self.link_target(m['target'], bool(m['img']), where)}{m['title'] or ''})"
            out.append(_re_link.sub(sub, line))
        return '\n'.join(out)

    # cells -----------------------------------------------------------------------------------------
    def markdown(self, src: str, where: str) -> str:
        "A Markdown cell: Quarto callouts become admonitions, links are rewritten"
        out, lines, i = [], src.splitlines(), 0
        while i < len(lines):
            m = _re_callout.match(lines[i])
            if not m: out.append(lines[i]); i += 1; continue
            j = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == ':::'), None)
            if j is None: raise DocsError(f'{where}: callout `{lines[i]}` has no closing `:::`')
            body, title = lines[i + 1:j], re.search(r'title="([^"]*)"', m['attrs'])
            title = title.group(1) if title else None
            if body and body[0].startswith('## '): title, body = body[0][3:].strip(), body[1:]
            kind = {'important': 'danger', 'caution': 'warning'}.get(m['kind'], m['kind'])
            out += [f'!!! {kind}' + (f' "{title}"' if title else ''), '', _indent('\n'.join(body)), '']
            i = j + 1
        return self.fix_links('\n'.join(out), where)

    def output(self, o, opts: dict, where: str) -> str | None:
        "One cell output as Markdown"
        if o.output_type == 'stream':
            txt = _re_ansi.sub('', o.text).rstrip()
            return _fence(txt, 'text') if txt else None
        if o.output_type == 'error':
            return _fence(_re_ansi.sub('', '\n'.join(o.traceback)) or f'{o.ename}: {o.evalue}', 'text')
        data = o.get('data', {})
        if 'text/markdown' in data:
            md = data['text/markdown']
            return self.fix_links(md if isinstance(md, str) else ''.join(md), where)
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')):
            if mime in data:
                self.n_img += 1
                dest = self.site.out / 'assets' / f'{Path(self.name).stem}_{self.n_img}.{ext}'
                dest.parent.mkdir(parents=True, exist_ok=True)
                raw = data[mime]
                if ext == 'svg': dest.write_text(raw if isinstance(raw, str) else ''.join(raw))
                else: dest.write_bytes(base64.b64decode(raw))
                alt = data.get('text/plain', 'output image')
                alt = (alt if isinstance(alt, str) else ''.join(alt)).strip('<>').replace('[', '').replace(']', '')
                return f'![{alt}](assets/{dest.name})'
        if 'text/html' in data:
            html = data['text/html']
            return '<div class="nb-output">\n' + (html if isinstance(html, str) else ''.join(html)).strip() + '\n</div>'
        if 'text/plain' in data:
            txt = data['text/plain']
            txt = txt if isinstance(txt, str) else ''.join(txt)
            if _re_default_repr.fullmatch(txt.strip()): return None  # `<x.Learner at 0x7f..>` says nothing
            return _fence(txt, 'text')
        return None

    def code(self, cell, i: int) -> str | None:
        "A code cell: its source (unless `echo: false`) and outputs (unless `output: false`)"
        opts, src = split_options(cell.source)
        where = self.where(i)
        if opts.get('include') is False: return None
        parts = []
        if opts.get('echo', True) is not False and src.strip():
            block = _fence(src, 'python')
            fold = opts.get('code-fold')
            if fold in (True, 'show'):
                summary = opts.get('code-summary', 'Code')
                block = f'???{"+" if fold == "show" else ""} abstract "{summary}"\n\n{_indent(block)}'
            flags = [f for f in ('slow', 'cuda') if opts.get(f) is True]
            if flags:
                how = ' '.join(flags)
                block = (f'!!! info "Runs with `nbdev-test --flags {how}`"\n\n'
                         f'    This cell needs {"a CUDA GPU" if "cuda" in flags else "minutes"}: '
                         f'the default test run skips it.\n\n{_indent(block)}')
            parts.append(block)
        if opts.get('output', True) is not False:
            parts += [md for o in cell.get('outputs', []) if (md := self.output(o, opts, where))]
        return '\n\n'.join(parts) or None

    def render(self) -> str:
        "The whole page: front matter for MkDocs, the title, the summary, then every cell"
        title = self.fm.get('title') or Path(self.name).stem
        meta = {'title': title.replace('`', ''), 'source_nb': self.src_nb.relative_to(self.site.root).as_posix()}
        if self.fm.get('description'): meta['description'] = self.fm['description'].replace('`', '')
        if 'order' in self.fm: meta['order'] = self.fm['order']
        meta['section'] = self.fm.get('section') or ('api' if _has_default_exp(self.src_nb) else 'guide')
        body = [f'# {title}']
        if self.fm.get('description'): body.append(f'<p class="nb-description">{_md_inline(self.fm["description"])}</p>')
        for i, c in enumerate(self.nb.cells):
            if c.cell_type == 'raw':
                if not _re_fm.match(c.source.strip()): body.append(c.source)
            elif c.cell_type == 'markdown':
                if c.source.strip() and not c.source.startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'):
                    body.append(self.markdown(c.source, self.where(i)))
            elif (md := self.code(c, i)) is not None: body.append(md)
        return '---\n' + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + '---\n\n' + '\n\n'.join(body) + '\n'


def _md_inline(s: str) -> str:
    "Backticks in a one-line summary as HTML code (it goes in a raw HTML paragraph)"
    s = s.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
    return re.sub(r'`([^`]+)`', r'<code>\1</code>', s)


def _has_default_exp(nb_path: Path) -> bool:
    nb = nbformat.read(nb_path, as_version=4)
    return any(c.cell_type == 'code' and re.search(r'^\s*#\|\s*default_exp\s', c.source, re.M) for c in nb.cells)


def py_line(path: Path, name: str, where: str = '') -> int:
    "Line where `def name` / `class name` (or `Class.method`) is defined in `path`: how docs cite a test"
    import ast
    tree, parts = ast.parse(path.read_text()), name.split('.')
    body = tree.body
    for k, part in enumerate(parts):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise DocsError(f'{where}: `{name}` is not defined in {path.name}: cite a test that exists '
                            f'(or write the test first, or leave a TODO without a link)')
        if k == len(parts) - 1: return node.lineno
        body = node.body
    raise AssertionError('unreachable')


def heading_ids(md: str) -> set[str]:
    "The ids MkDocs gives the headings of Markdown page `md` (Pandoc's rules, see `pandoc_slug`)"
    ids, fence = set(), None
    for line in md.split('\n'):
        m = re.match(r'^\s*(`{3,}|~{3,})', line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence): fence = None
            continue
        if m: fence = m.group(1); continue
        if h := re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line):
            text = h.group(1)
            if explicit := re.search(r'\{\s*#([^\s}]+)[^}]*\}\s*$', text): ids.add(explicit.group(1)); continue
            text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text).replace('`', '')
            ids.add(pandoc_slug(text))
    return ids


def resolve_autolinks(md: str, anchors: dict[str, set[str]]) -> tuple[str, list[str]]:
    "Keep nbdev's links to names a page documents; unlink the others (private helpers, undocumented methods)"
    dropped = []

    def sub(m):
        page, anchor = m['page'], m['anchor']
        if page in anchors and (anchor is None or anchor in anchors[page]):
            return f"[{m['text']}]({page}{'#' + anchor if anchor else ''})"
        dropped.append(f'{page}#{anchor}')
        return m['text']
    return _re_autolink.sub(sub, md), dropped
