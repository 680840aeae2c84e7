"""Installing into one's own project (issue 24, point 8): the extras in pyproject.toml match the optional hosts and
the plots, the README gives the install line, and a missing optional package fails with an `ImportError` that names
the extra to install. A missing package is simulated in a fresh interpreter with `sys.modules[name] = None`, which
makes `import name` raise ImportError."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
EXTRAS = PROJECT['optional-dependencies']


def names(reqs) -> set[str]:
    "The distribution names (with their extras) of requirement strings: 'fastai>=2.8' -> 'fastai'"
    return {re.match(r'[A-Za-z0-9_.-]+(\[[^\]]*\])?', r.strip()).group(0) for r in reqs}


def test_extras_match_the_hosts_and_the_plot():
    assert names(EXTRAS['fastai']) == {'fastai'}
    assert names(EXTRAS['lightning']) == {'lightning'}
    assert names(EXTRAS['plot']) == {'matplotlib'}
    assert names(EXTRAS['all']) == {'channelslast_cb[fastai,lightning,plot]'}
    assert 'channelslast_cb[all]' in names(EXTRAS['dev'])  # dev builds on them, and does not repeat them
    assert not names(EXTRAS['dev']) & {'fastai', 'lightning', 'matplotlib'}
    assert not names(PROJECT['dependencies']) & {'fastai', 'lightning', 'matplotlib'}  # all three stay optional


def test_readme_gives_the_install_line():
    readme = (ROOT / 'README.md').read_text()
    repo = PROJECT['urls']['Repository']
    assert f'pip install "channelslast_cb[fastai] @ git+{repo}"' in readme
    assert 'pip install ".[fastai]"' in readme
    for extra in ('fastai', 'lightning', 'plot', 'all'): assert f'| `{extra}` |' in readme, extra


def run_without(missing: list[str], code: str) -> subprocess.CompletedProcess:
    "Run `code` in a fresh interpreter in which every package in `missing` fails to import"
    pre = ''.join(f"sys.modules[{m!r}] = None\n" for m in missing)
    src = "import sys\n" + pre + textwrap.dedent(code)
    return subprocess.run([sys.executable, '-c', src], capture_output=True, text=True, timeout=300, cwd=ROOT)


def import_error(missing: str, stmt: str) -> str:
    r = run_without([missing], f"""
        try: {stmt}
        except ImportError as e: print('IMPORT-ERROR', e)
        else: print('IMPORTED')
        """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'IMPORT-ERROR' in r.stdout, r.stdout
    return r.stdout


@pytest.mark.parametrize('missing,stmt,extra', [
    ('fastai', 'import channelslast_cb.fastai', 'fastai'),
    ('lightning', 'from channelslast_cb.lightning import ChannelsLast', 'lightning'),
    ('matplotlib', 'from channelslast_cb.progress import LossGraph; LossGraph().update_graph([([0, 1], [1., .5])])',
     'plot'),
])
def test_a_missing_package_names_its_extra(missing, stmt, extra):
    out = import_error(missing, stmt)
    assert f'needs {missing}, which is not installed' in out, out
    assert f'pip install "channelslast_cb[{extra}]"' in out and f'pip install ".[{extra}]"' in out, out


def test_bench_plot_without_matplotlib_says_which_extra():
    "Checked before anything is timed: exit 2 with the install line, as any bad argument"
    r = run_without(['matplotlib'], """
        from channelslast_cb.bench import main
        main(['test_resnet', '--device', 'cpu', '--plot', 'speedups.png'])
        """)
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert 'channelslast-bench --plot needs matplotlib' in r.stderr, r.stderr[-3000:]
    assert 'pip install "channelslast_cb[plot]"' in r.stderr and 'Traceback' not in r.stderr


def test_the_library_works_without_any_extra():
    "Our Learner trains, and the bench's names resolve, with fastai, Lightning and matplotlib all missing"
    r = run_without(['fastai', 'lightning', 'pytorch_lightning', 'matplotlib'], """
        import torch, torch.nn.functional as F
        from torch import nn
        from channelslast_cb.all import *
        from channelslast_cb.bench import resolve_model
        x = torch.randn(32, 3, 8, 8); y = (x.mean((1, 2, 3)) > 0).long()
        dls = DataLoaders.from_tensors((x, y), valid=(x, y), bs=8)
        learn = Learner(dls, nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                        loss_func=F.cross_entropy, progress=False, cbs=ChannelsLast())
        learn.fit(1)
        assert resolve_model('resnet18') == ('timm', 'resnet18')
        assert not {'fastai', 'lightning', 'matplotlib'} & {m.split('.')[0] for m in sys.modules if sys.modules[m]}
        print('TRAINED')
        """)
    assert r.returncode == 0 and 'TRAINED' in r.stdout, r.stderr[-3000:]
