"""The docs site in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Builds the site with `make docs`'s script when `site/` is missing or older than its sources, serves it on
127.0.0.1 (a free port, a thread), and checks what a reader sees: the home page, the `ChannelsLast` API
page and the guide render with their title and content, the benchmark plot loads, search finds a symbol,
and no page asks the local server for something it does not have. Screenshots go to `artifacts/screens/`
(git-ignored) for a human to look at.

Skips with the reason when Chromium or Playwright is missing (`make test` installs Chromium where it can).
Nothing leaves the machine: requests to any host other than the local server are aborted.
"""
from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE, SCREENS = ROOT / 'site', ROOT / 'artifacts' / 'screens'
ZOO_PNG = ROOT / 'benchmarks' / 'results' / 'zoo.png'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']


def chromium_path() -> str | None:
    for p in ('/usr/bin/chromium', shutil.which('chromium') or '', shutil.which('chromium-browser') or ''):
        if p and Path(p).exists(): return p
    return None


def _sources_mtime() -> float:
    files = [*ROOT.glob('nbs/*.ipynb'), *ROOT.glob('docs/**/*'), *ROOT.glob('tools/docs/*.py'),
             *ROOT.glob('channelslast_cb/*.py'), *ROOT.glob('benchmarks/results/*'), ROOT / 'pyproject.toml']
    return max(f.stat().st_mtime for f in files if f.is_file())


@pytest.fixture(scope='module')
def site() -> Path:
    "The built site, rebuilt when a notebook, page or the converter is newer than it"
    index = SITE / 'index.html'
    if not index.exists() or index.stat().st_mtime < _sources_mtime():
        r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs' / 'build.py')], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, f'the docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return SITE


@pytest.fixture(scope='module')
def base_url(site):
    "The site served over HTTP on 127.0.0.1, on a free port, from a thread"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()


@pytest.fixture(scope='module')
def browser(tmp_path_factory, base_url):
    "A fresh headless Chromium profile; requests to hosts other than the local server are aborted"
    exe = chromium_path()
    if exe is None:
        pytest.skip('no Chromium: install Debian packages `chromium chromium-driver` (make test does, as root)')
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed: pip install -e ".[dev]"')
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp('chromium-profile')), executable_path=exe, headless=True,
            args=CHROMIUM_FLAGS, viewport={'width': 1280, 'height': 900})
        ctx.set_default_timeout(10_000)
        ctx.route('**/*', lambda route: route.continue_() if route.request.url.startswith(base_url) else route.abort())
        ctx.bad = []  # local responses >= 400: a page asked for something the site does not have
        ctx.on('response', lambda r: ctx.bad.append(f'{r.status} {r.url}') if r.url.startswith(base_url) and r.status >= 400 else None)
        yield ctx
        ctx.close()


def open_page(browser, url: str, shot: str):
    page = browser.new_page()
    page.goto(url, wait_until='load')
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / f'{shot}.png'), full_page=False)
    return page


def nb_title(nb: Path) -> str:
    "The `# Title` a notebook starts with (nbdev makes it the page title)"
    import nbformat
    md = next(c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == 'markdown')
    return md.split('\n')[0].lstrip('#').strip()


def h1(page) -> str: return page.locator('article h1').first.inner_text().rstrip('¶').strip()  # ¶: permalink


def test_home_page(browser, base_url):
    page = open_page(browser, base_url + '/', 'home')
    assert page.title().startswith('channelslast_cb'), page.title()
    assert h1(page) == 'channelslast_cb'
    assert 'make test' in page.locator('article').inner_text()
    nav = page.locator('nav.md-nav--primary').inner_text()
    assert 'API reference' in nav and 'Learner' in nav, nav
    assert browser.bad == [], browser.bad


def test_learner_api_page_has_signature_and_source_link(browser, base_url):
    page = open_page(browser, base_url + '/learner/', 'learner')
    assert h1(page) == 'Learner'
    art = page.locator('article').inner_text()
    assert 'def DataLoaders(' in art and '# where batches go' in art, 'signature with docments missing'
    src = page.locator('a:has-text("source")').first.get_attribute('href')
    assert src.startswith('https://github.com/channelslast-cb/channelslast_cb/blob/main/channelslast_cb/learner.py#L'), src
    assert browser.bad == [], browser.bad


@pytest.mark.skipif(not (ROOT / 'nbs' / '03_channelslast.ipynb').exists(),
                    reason='nbs/03_channelslast.ipynb is not written yet (issue 3): no ChannelsLast page to open')
def test_channelslast_api_page(browser, base_url):
    page = open_page(browser, base_url + '/channelslast/', 'channelslast')
    title = nb_title(ROOT / 'nbs' / '03_channelslast.ipynb')
    assert h1(page) == title.replace('`', ''), (h1(page), title)
    assert page.title().startswith(title.replace('`', '')), page.title()
    art = page.locator('article').inner_text()
    assert 'def ChannelsLast(' in art, 'no ChannelsLast signature on the page'
    assert 'to_channelslast(' in art
    assert page.locator('[id="channelslast"]').count() == 1, 'the #channelslast anchor nbdev links to is missing'
    assert page.locator('h3:has-text("Learner.to_channelslast")').count() == 1
    assert browser.bad == [], browser.bad


def test_lightning_pages(browser, base_url):
    "The Lightning API page (the callback's signature with its docments) and its guide"
    page = open_page(browser, base_url + '/lightning/', 'lightning')
    assert h1(page) == nb_title(ROOT / 'nbs' / '10_lightning.ipynb').replace('`', '')
    art = page.locator('article').inner_text()
    assert 'def ChannelsLast(' in art and 'repair:bool=False' in art.replace(' ', ''), 'no ChannelsLast signature'
    assert page.locator('[id="channelslast"]').count() == 1
    page = open_page(browser, base_url + '/guide_lightning/', 'guide_lightning')
    assert h1(page) == 'Using it with Lightning'
    assert 'Trainer(callbacks=[ChannelsLast()])' in page.locator('article').inner_text()
    assert browser.bad == [], browser.bad


def test_guide_page(browser, base_url):
    page = open_page(browser, base_url + '/guide_will_it_help/', 'guide')
    assert h1(page) == 'Will channels-last help my model?'
    assert 'channelslast-bench' in page.locator('article').inner_text()
    assert browser.bad == [], browser.bad


@pytest.mark.skipif(not ZOO_PNG.exists(), reason='benchmarks/results/zoo.png is not committed yet (issue 5)')
def test_guide_plot_loads(browser, base_url):
    page = open_page(browser, base_url + '/guide_will_it_help/', 'guide_plot')
    img = page.locator('article img[src*="zoo"]')
    assert img.count() == 1, 'the guide does not show benchmarks/results/zoo.png'
    img.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENS / 'guide_plot.png'))
    assert img.evaluate('i => i.complete && i.naturalWidth') > 0, 'the plot did not load'


def test_search_finds_a_symbol(browser, base_url):
    page = open_page(browser, base_url + '/', 'search')
    box = page.locator('input.md-search__input')
    box.click()
    box.press_sequentially('TrainEvalCallback')
    hit = page.locator('.md-search-result__item a').first
    hit.wait_for(state='visible', timeout=15_000)
    page.screenshot(path=str(SCREENS / 'search.png'))
    assert 'TrainEvalCallback' in page.locator('.md-search-result').inner_text()
    hit.click()
    page.wait_for_load_state('load')
    assert '/learner/' in page.url, page.url
