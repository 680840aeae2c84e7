"""The docs converter (tools/docs) and the Quarto config nbdev-docs needs.

The full build runs in `make docs` (before pytest in `make test`); these check the converter's rules on
small inputs, so a regression says which rule broke, and that nbdev's own config files stay valid.
"""
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'docs'))
from check_site import check_site  # noqa: E402
from nb2md import (DocsError, PageWriter, Site, heading_ids, pandoc_slug, py_line, resolve_autolinks,  # noqa: E402
                   split_options)


def test_pandoc_slug_matches_nbdev_anchors():
    "nbdev links `learner.html#learner.fit`: headings must get Pandoc's ids, dots and underscores kept"
    assert pandoc_slug('Learner.fit') == 'learner.fit'
    assert pandoc_slug('Callback.__init__') == 'callback.__init__'
    assert pandoc_slug('Will channels-last help my model?') == 'will-channels-last-help-my-model'
    assert pandoc_slug('1. Set up') == 'set-up'


def test_split_options_reads_quarto_cell_options():
    opts, src = split_options('#| echo: false\n#| output: asis\n#| slow: true\nshow_doc(f)')
    assert opts == {'echo': False, 'output': 'asis', 'slow': True} and src == 'show_doc(f)'


@pytest.fixture
def page(tmp_path):
    "A processed notebook with one cell per rule, in a throwaway repository layout"
    (tmp_path / 'nbs').mkdir(); (tmp_path / 'tests').mkdir(); (tmp_path / 'benchmarks').mkdir()
    (tmp_path / 'tests' / 'test_x.py').write_text('import os\n\n\ndef test_real():\n    assert True\n')
    (tmp_path / 'benchmarks' / 'plot.png').write_bytes(b'\x89PNG fake')
    src = tmp_path / 'nbs' / 'guide_x.ipynb'

    def make(*cells):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell('---\ntitle: A `Guide`\ndescription: d\norder: 2\n---'),
                                             *cells])
        nbformat.write(nb, src)
        site = Site(root=tmp_path, nbs=tmp_path / 'nbs', out=tmp_path / 'out', repo_url='https://github.com/o/r',
                    branch='main', doc_url='https://o.github.io/r')
        site.pages.update({'guide_x': 'guide_x.md', '03_channelslast': 'channelslast.md', 'channelslast': 'channelslast.md'})
        return PageWriter(site, src, src)
    return make


def test_links_are_rewritten_for_the_static_site(page):
    md = page(nbformat.v4.new_markdown_cell(
        'See [`ChannelsLast`](https://o.github.io/r/channelslast.html#channelslast), '
        '[the notebook](03_channelslast.ipynb#to_channelslast), '
        '[`test_real`](../tests/test_x.py#test_real), ![plot](../benchmarks/plot.png) and '
        '`[not a link](x.ipynb)`.')).render()
    assert '[`ChannelsLast`](nbdev-autolink:channelslast.md#channelslast)' in md
    assert '[the notebook](channelslast.md#to_channelslast)' in md
    assert '[`test_real`](https://github.com/o/r/blob/main/tests/test_x.py#L4)' in md
    assert '![plot](assets/benchmarks_plot.png)' in md
    assert '`[not a link](x.ipynb)`' in md
    assert md.startswith('---\ntitle: A Guide\n') and '\n# A `Guide`\n' in md


@pytest.mark.parametrize('target, error', [
    ('../tests/test_x.py#test_missing', '`test_missing` is not defined in test_x.py'),
    ('../tests/nope.py', 'does not exist'),
    ('04_audit.ipynb', 'no page is made from'),
    ('03_channelslast.ipynb#nowhere', None),  # a hand-written anchor is checked by mkdocs --strict
])
def test_a_link_to_nothing_fails_the_build(page, target, error):
    if error is None: return
    with pytest.raises(DocsError, match=error):
        page(nbformat.v4.new_markdown_cell(f'[cited]({target})')).render()


def test_nbdev_autolinks_to_undocumented_names_become_plain_code():
    md = ('## `ChannelsLast`\n\n### Learner.fit\n\n```python\n# not a heading\n```\n'
          'see [`Learner.fit`](nbdev-autolink:learner.md#learner.fit), [`_Probe`](nbdev-autolink:learner.md#_probe) '
          'and [the page](nbdev-autolink:learner.md)')
    ids = heading_ids(md)
    assert ids == {'channelslast', 'learner.fit'}
    out, dropped = resolve_autolinks(md, {'learner.md': ids})
    assert '[`Learner.fit`](learner.md#learner.fit)' in out and ', `_Probe` and' in out
    assert '[the page](learner.md)' in out and dropped == ['learner.md#_probe']
    out, dropped = resolve_autolinks('[`X`](nbdev-autolink:gone.md#x)', {'learner.md': ids})
    assert out == '`X`' and dropped == ['gone.md#x']


def test_cell_options_and_outputs(page):
    shown = nbformat.v4.new_code_cell('#| echo: false\n#| output: asis\nshow_doc(f)', outputs=[
        nbformat.v4.new_output('execute_result', data={'text/markdown': '### f\n\n```python\ndef f(x): # the x\n```'})])
    hidden = nbformat.v4.new_code_cell('#| include: false\nsecret = 1')
    folded = nbformat.v4.new_code_cell('#| code-fold: show\n#| code-summary: "Exported source"\ndef f(x): return x')
    slow = nbformat.v4.new_code_cell('#| slow: true\nbig()', outputs=[nbformat.v4.new_output('stream', text='done\n')])
    learner = nbformat.v4.new_code_cell('learn.to_fp32()', outputs=[nbformat.v4.new_output(
        'execute_result', data={'text/plain': '<channelslast_cb.learner.Learner at 0x7f64bd01d710>'})])
    md = page(shown, hidden, folded, slow, learner).render()
    assert '0x7f64' not in md and 'learn.to_fp32()' in md
    assert 'show_doc(f)' not in md and '### f' in md and 'def f(x): # the x' in md
    assert 'secret' not in md
    assert '???+ abstract "Exported source"\n\n    ```python\n    def f(x): return x' in md
    assert 'nbdev-test --flags slow' in md and '```text\ndone\n```' in md


def test_callout_becomes_admonition(page):
    md = page(nbformat.v4.new_markdown_cell('::: {.callout-warning}\n## On CPU\nbf16 needs AVX-512 BF16.\n:::')).render()
    assert '!!! warning "On CPU"\n\n    bf16 needs AVX-512 BF16.' in md


def test_py_line_finds_methods(tmp_path):
    f = tmp_path / 'm.py'
    f.write_text('class TestA:\n    def test_b(self): pass\n')
    assert py_line(f, 'TestA.test_b') == 2
    with pytest.raises(DocsError): py_line(f, 'TestA.test_c')


def test_check_site_finds_broken_anchor_and_file(tmp_path):
    (tmp_path / 'index.html').write_text('<h2 id="ok">x</h2><a href="#ok">a</a><a href="p/#nope">b</a><img src="gone.png">')
    (tmp_path / 'p').mkdir(); (tmp_path / 'p' / 'index.html').write_text('<h1 id="top">p</h1>')
    problems = check_site(tmp_path)
    assert len(problems) == 2, problems
    assert any('no id "nope"' in p for p in problems) and any('gone.png' in p for p in problems)


def test_quarto_config_is_nbdevs(monkeypatch):
    "nbdev-docs needs nbs/_quarto.yml and an nbs/nbdev.yml that says what pyproject.toml says"
    from nbdev import quarto
    from nbdev.config import get_config
    cfg = get_config()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    assert (ROOT / 'nbs' / 'nbdev.yml').read_text() == quarto._nbdev_yml.format(doc_path=cfg.doc_path.name, **vals), \
        'nbs/nbdev.yml is stale: run nbdev-proc-nbs (or nbdev-docs) and commit it'
    q = yaml.safe_load((ROOT / 'nbs' / '_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and 'nbdev.yml' in q['metadata-files']
    assert (ROOT / 'nbs' / q['format']['html']['css']).exists()
