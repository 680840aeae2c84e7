"""Every warning of the package points at the user's line, on every host (issue 24, point 5).

A warning raised deep inside the library, or inside fastai's or Lightning's loop that called us, must name the line
the user wrote (`learn.to_fp16()`, `learn.fit(1)`, `trainer.fit(...)`), so that `w.filename` is this file and
`w.lineno` the line of the call. The slow-precision measurements are injected (`fresh` seeds the probe cache), so no
timing decides anything here.
"""
import sys
import warnings

import pytest
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from helpers import synth_images, tiny_cnn_no_conv_bias

from channelslast_cb import fp16
from channelslast_cb.core import HOST_PACKAGES, warn
from channelslast_cb.fp16 import AMPMode, AMPSpeed, AMPSpeedWarning, MixedPrecision, SkippedStepsWarning
from channelslast_cb.all import DataLoaders, Learner  # all: `to_channelslast` patched onto the Learner

SLOW = {m: AMPSpeed('cpu', m, 9., False) for m in (AMPMode.FP16, AMPMode.BF16)}  # both measured 9x fp32's time


def line() -> int:
    "The caller's line number: put it on the same line as the call under test"
    return sys._getframe(1).f_lineno


@pytest.fixture
def slow(monkeypatch):
    "fp16 and bf16 measured much slower than fp32 on this CPU, and no warning given yet in this process"
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {('cpu', m): s for m, s in SLOW.items()})
    monkeypatch.setattr(fp16, '_warned', set())


def only(ws, category) -> list:
    return [w for w in ws if issubclass(w.category, category)]


def assert_here(ws, category, lineno):
    got = only(ws, category)
    assert len(got) == 1, [str(w.message)[:80] for w in ws]
    assert (got[0].filename, got[0].lineno) == (__file__, lineno), (got[0].filename, got[0].lineno, str(got[0].message)[:80])


inf_loss = lambda pred, y: F.cross_entropy(pred, y) * float('inf')


# ---------------------------------------------------------------- the helper itself

def _fake_module(name: str, src: str, **names) -> dict:
    "Run `src` as if it were the module `name` (its frames then count as that package's)"
    g = {'__name__': name, **names}
    exec(compile(src, name.replace('.', '/') + '.py', 'exec'), g)
    return g


def test_warn_skips_the_package_and_the_hosts_that_call_it():
    lib = _fake_module('channelslast_cb.fake', "def inner():\n    warn('deep', RuntimeWarning)\n", warn=warn)
    host = _fake_module('lightning.pytorch.fake', "def fit(f):\n    return f()\n")
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        host['fit'](lib['inner']); here = line()
    assert_here(ws, RuntimeWarning, here)
    assert {'channelslast_cb', 'fastai', 'fastcore', 'lightning', 'pytorch_lightning', 'torch'} <= HOST_PACKAGES


def test_a_user_callback_is_the_users_line():
    "A user's own function between the host and us is where the warning points: that is the user's call"
    lib = _fake_module('channelslast_cb.fake', "def inner():\n    warn('deep', RuntimeWarning)\n", warn=warn)
    host = _fake_module('fastai.fake', "def fit(f):\n    return f()\n")
    def users_callback(): lib['inner'](); return line()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        here = host['fit'](users_callback)
    assert_here(ws, RuntimeWarning, here)


def test_filters_and_the_once_registry_still_work():
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('ignore', RuntimeWarning)
        warn('ignored', RuntimeWarning)
    assert ws == []
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        with pytest.raises(RuntimeWarning, match='raised'): warn('raised', RuntimeWarning)


# ---------------------------------------------------------------- our Learner

def ours(**kwargs) -> Learner:
    dls = DataLoaders.from_tensors(synth_images(32), valid=synth_images(16, seed=1), bs=8)
    return Learner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, progress=False, **kwargs)


def test_ours_to_fp16_and_to_channelslast(slow):
    learn = ours()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.to_fp16(); here = line()
    assert_here(ws, AMPSpeedWarning, here)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        ours().to_channelslast(amp_mode='bf16'); here = line()
    assert_here(ws, AMPSpeedWarning, here)


def test_ours_warnings_inside_the_fit_point_at_fit(slow):
    "A MixedPrecision passed in `cbs=` is checked at before_fit; an all-skipped epoch warns at after_train"
    learn = ours(cbs=MixedPrecision('fp16'))
    learn.loss_func = inf_loss
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.fit(1); here = line()
    assert_here(ws, AMPSpeedWarning, here)
    assert_here(ws, SkippedStepsWarning, here)


# ---------------------------------------------------------------- fastai's Learner

@pytest.fixture(scope='module')
def fastai_learner():
    pytest.importorskip('fastai', reason='fastai is not installed')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fastai's import-time deprecation notices
        import fastai.learner as flearner
        from fastai.data.core import DataLoaders as FaiDataLoaders
        import channelslast_cb.fastai as m
    m.patch_fastai()

    def make():
        dls = FaiDataLoaders.from_dsets(TensorDataset(*synth_images(32)), TensorDataset(*synth_images(16, seed=1)),
                                        bs=8, device='cpu')
        return flearner.Learner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy)
    yield make
    m.unpatch_fastai()


def test_fastai_to_fp16_and_to_channelslast(slow, fastai_learner):
    learn = fastai_learner()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.to_fp16(); here = line()
    assert_here(ws, AMPSpeedWarning, here)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        fastai_learner().to_channelslast(amp_mode='bf16'); here = line()
    assert_here(ws, AMPSpeedWarning, here)


def test_fastai_warnings_inside_its_fit_point_at_fit(slow, fastai_learner):
    learn = fastai_learner()
    learn.add_cb(MixedPrecision('fp16'))
    learn.loss_func = inf_loss
    with warnings.catch_warnings(record=True) as ws, learn.no_logging(), learn.no_bar():
        warnings.simplefilter('always')
        learn.fit(1); here = line()
    assert_here(ws, AMPSpeedWarning, here)
    assert_here(ws, SkippedStepsWarning, here)


# ---------------------------------------------------------------- Lightning's Trainer

def test_lightning_warning_points_at_trainer_fit(slow):
    pytest.importorskip('lightning', reason='Lightning is not installed')
    from lightning_helpers import Classifier, loader, trainer
    from channelslast_cb.lightning import ChannelsLast
    t = trainer(ChannelsLast(), precision='bf16-mixed', max_steps=1)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        t.fit(Classifier(), loader()); here = line()
    assert_here(ws, AMPSpeedWarning, here)
