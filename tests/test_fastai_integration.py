"""`channelslast_cb.fastai`: our fixes inside fastai 2.8's own `Learner` (issue 10, second half).

`import channelslast_cb.fastai` patches fastai's `Learner` for the whole process. So that the other test files that
check plain fastai (test_channelslast.py's "fastai ends wrong", test_fastai_client.py) see fastai as it is, this
file imports the module inside a module-scoped fixture and calls `unpatch_fastai()` when it is done.
Processes that must start clean (import orders, fastai not installed, the fp16 decision) run as subprocesses,
all started at once when the module starts and read by the tests that need them.
"""
import contextlib
import copy
import itertools
import re
import subprocess
import sys
import textwrap
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from helpers import (LeNet, Spectrogram, Uint8Net, ViewMLP, as_uint8, record_c2, synth_images, tiny_cnn,
                     tiny_cnn_no_conv_bias)
from channelslast_cb.channelslast import ChannelsLastWarning

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import CancelBatchException as OurCancelBatch, Callback as OurCallback
from channelslast_cb.fp16 import AMPMode, MixedPrecision, decide_amp
from channelslast_cb.learner import DataLoaders, Learner

pytest.importorskip('fastai', reason='fastai is not installed: channelslast_cb.fastai needs fastai 2.8')
with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # fastai's import-time pandas option and torch.cuda.amp deprecations
    import fastai.callback.core as fcore  # noqa: E402
    import fastai.learner as flearner  # noqa: E402
    from fastai.callback.channelslast import ChannelsLast as FaiChannelsLast  # noqa: E402
    from fastai.callback.core import Callback as FaiCallback  # noqa: E402
    from fastai.callback.fp16 import MixedPrecision as FaiMixedPrecision  # noqa: E402
    from fastai.callback.schedule import fine_tune  # noqa: E402,F401 (patches Learner.fine_tune)
    from fastai.callback.tracker import SaveModelCallback  # noqa: E402
    from fastai.callback.training import GradientAccumulation  # noqa: E402
    from fastai.data.core import DataLoaders as FaiDataLoaders  # noqa: E402
    from fastai.optimizer import Adam as FaiAdam, OptimWrapper  # noqa: E402

pytestmark = [pytest.mark.filterwarnings('ignore:fp16 mixed precision on this CPU:RuntimeWarning'),
              pytest.mark.filterwarnings('ignore:.*chained_assignment'),
              pytest.mark.filterwarnings('ignore::FutureWarning')]

CL = torch.channels_last
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module', autouse=True)
def patched():
    "Import (and so patch) channelslast_cb.fastai for this module only"
    import channelslast_cb.fastai as m
    m.patch_fastai()
    yield m
    m.unpatch_fastai()


def is_cl(t): return t.is_contiguous(memory_format=CL)


def learner(model=None, cbs=None, opt_func=FaiAdam, n=32, bs=8, **kwargs):
    "A fastai Learner on fastai's own DataLoaders of 3x8x8 images (n training, 16 validation)"
    dls = FaiDataLoaders.from_dsets(TensorDataset(*synth_images(n)), TensorDataset(*synth_images(16, seed=1)), bs=bs,
                                    device='cpu')
    return flearner.Learner(dls, model if model is not None else tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy,
                            opt_func=opt_func, cbs=cbs, **kwargs)


def quiet_fit(learn, *args, **kwargs):
    with learn.no_logging(): return learn.fit(*args, **kwargs)


class Dtypes(FaiCallback):
    "Records the dtype of the first convolution's output in every forward (a forward hook), and the pred's dtype"
    order = 60
    def before_fit(self):
        self.acts, self.preds = [], []
        self.h = self.learn.model[0].register_forward_hook(lambda m, i, o: self.acts.append(o.dtype))
    def after_pred(self): self.preds.append((self.learn.pred.dtype, torch.is_autocast_enabled('cpu')))
    def after_fit(self): self.h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Fresh processes, started together when this module starts
SCRIPTS = {
    # our module first, then the user's star import: fastai's own to_channelslast must not come back
    'ours_first': """
        import warnings; warnings.simplefilter('ignore')
        import channelslast_cb.fastai
        from fastai.vision.all import *
        {fp16_setup}
        learn = Learner(DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=8, device='cpu'), net(),
                        loss_func=F.cross_entropy).to_fp16()
        {fp16_fit}
        {check}
    """,
    # the star import first, then ours
    'fastai_first': """
        import warnings; warnings.simplefilter('ignore')
        from fastai.vision.all import *
        import channelslast_cb.fastai
        {check}
    """,
    # fastai not installed: a meta-path finder refuses it
    'no_fastai': """
        import sys
        class NoFastai:
            def find_spec(self, name, path=None, target=None):
                if name == 'fastai' or name.startswith('fastai.'): raise ImportError(f"No module named {name!r} (blocked)")
        sys.meta_path.insert(0, NoFastai())
        import torch, torch.nn.functional as F
        import channelslast_cb
        from channelslast_cb.all import *
        assert not any(m == 'fastai' or m.startswith('fastai.') for m in sys.modules), 'fastai was imported'
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, 8, 8, generator=g); y = (x.mean((1, 2, 3)) > 0).long()
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 2))
        learn = Learner(DataLoaders.from_tensors((x, y), bs=8), net, loss_func=F.cross_entropy, progress=False)
        assert learn.to_channelslast(amp_mode='bf16') is learn
        learn.fit(1)
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        try: import channelslast_cb.fastai
        except ImportError as e: print('IMPORT-ERROR', e)
        else: raise AssertionError('channelslast_cb.fastai imported without fastai')
        print('OK')
    """,
    # the fp16 decision on our Learner (on fastai's: in 'ours_first')
    'fp16_ours': """
        import warnings
        from channelslast_cb.all import *
        {fp16_setup}
        learn = Learner(DataLoaders.from_tensors((x, y), (x, y), bs=8), net(), loss_func=F.cross_entropy,
                        progress=False).to_fp16()
        {fp16_fit}
    """,
}
CHECK = """
    import torch
    from torch.utils.data import TensorDataset
    import channelslast_cb.fastai as m
    from channelslast_cb.channelslast import ChannelsLast as OurCL
    from channelslast_cb.fp16 import MixedPrecision as OurMP
    for k in ('to_channelslast', 'to_contiguous', 'to_fp16', 'to_bf16', 'to_fp32', 'layout_report', 'save', 'load'):
        assert getattr(Learner, k) is m._OURS[k], k
    x = torch.randn(16, 3, 8, 8); y = torch.randint(0, 2, (16,))
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=8, device='cpu')
    import torch.nn.functional as F
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    learn = Learner(dls, net, loss_func=F.cross_entropy)
    assert learn.to_channelslast(use_amp=False).to_channelslast() is learn
    print('CBS', sorted(type(cb).__module__ + '.' + type(cb).__name__ for cb in learn.cbs if isinstance(cb, (OurCL, OurMP))))
"""
FP16_SETUP = """
    import torch, torch.nn.functional as F
    from torch.utils.data import TensorDataset
    caught = []  # every warning from here on: the learner's creation, to_fp16() and the fit
    warnings.simplefilter('always')
    warnings.showwarning = lambda message, category, *args, **kwargs: caught.append((category, message))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g); y = (x.mean((1, 2, 3)) > 0).long()
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 2))
"""
FP16_FIT = """
    if hasattr(learn, 'no_logging'):
        with learn.no_logging(): learn.fit(1)
    else: learn.fit(1)
    for category, message in caught:
        if issubclass(category, RuntimeWarning): print('WARNING', category.__name__, str(message))
    print('OK')
"""


def _script(name):
    body = textwrap.dedent(SCRIPTS[name])
    for key, val in (('{check}', CHECK), ('{fp16_setup}', FP16_SETUP), ('{fp16_fit}', FP16_FIT)):
        body = body.replace(key, textwrap.dedent(val))
    return body


@pytest.fixture(scope='module', autouse=True)
def procs():
    "Start every script when the module starts (they run beside the tests above them); results by name"
    env = {'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1'}
    started = {k: subprocess.Popen([sys.executable, '-c', _script(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, cwd=ROOT) for k in SCRIPTS}
    done = {}
    def result(name):
        if name not in done:
            out, err = started[name].communicate(timeout=300)
            done[name] = (started[name].returncode, out, err)
        return done[name]
    yield result
    for p in started.values():
        if p.poll() is None: p.kill()


# ---------------------------------------------------------------------------------------------------------------
# The state table, on fastai's Learner
from test_channelslast import DEF, KW, OPS  # the same calls and expected scaler settings as our Learner's table

STARTS = {  # the callbacks the learner is built with
    '': lambda: None,
    'cbs': lambda: [ChannelsLast()],                 # ours
    'fai_cl': lambda: [FaiChannelsLast()],           # fastai's own, as `from fastai.vision.all import *` names it
    'fai_mp': lambda: [FaiMixedPrecision()],
}
_DSETS = TensorDataset(*synth_images(16)), TensorDataset(*synth_images(16, seed=1))
_MODEL = tiny_cnn_no_conv_bias()


def run(start, seq):
    dls = FaiDataLoaders.from_dsets(*_DSETS, bs=8, device='cpu')
    learn = flearner.Learner(dls, copy.deepcopy(_MODEL), loss_func=F.cross_entropy, cbs=STARTS[start]())
    for op in seq: assert OPS[op](learn) is learn, f"{op} did not return the learner"
    return learn


def layout(model):
    got = {'cl' if is_cl(p) and not p.is_contiguous() else 'cf' for p in model.parameters() if p.dim() == 4}
    return got.pop() if len(got) == 1 else 'mixed'


def state(learn):
    cls = [cb for cb in learn.cbs if isinstance(cb, ChannelsLast)]
    mps = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    fai = sorted(type(cb).__name__ for cb in learn.cbs if isinstance(cb, (FaiChannelsLast, FaiMixedPrecision)))
    mp = mps[0] if len(mps) == 1 else None
    # `learn.<name>` is the callback of that name that is attached (ours when both kinds are)
    named = all(getattr(learn, n, None) is next((cb for cb in learn.cbs if cb.name == n and isinstance(cb, ours)),
                                                 next((cb for cb in learn.cbs if cb.name == n), None))
                for n, ours in (('channels_last', ChannelsLast), ('mixed_precision', MixedPrecision)))
    return dict(n_cl=len(cls), n_mp=len(mps), mode=mp and mp.amp_mode.value, scaler=mp and mp.scaler_kwargs,
                fastai=fai, layout=layout(learn.model), named=named)


def reference(start, seq):
    "What the calls ask for: ours attached or not, our precision, fastai's own callbacks left"
    cl, mp = start == 'cbs', None
    fai = {'fai_cl': {'ChannelsLast'}, 'fai_mp': {'MixedPrecision'}}.get(start, set())
    for op in seq:
        if op.startswith('cl'): cl = True; fai.discard('ChannelsLast')
        if op.startswith('cont'): cl = False; fai.discard('ChannelsLast')
        if op == 'cl': mp = ('auto', DEF)  # the default amp_mode: the precision that is fast on this machine
        if op in ('fp16', 'cl_fp16'): mp = ('fp16', DEF)
        if op in ('cl_bf16', 'bf16'): mp = ('bf16', {})
        if op == 'cl_kw': mp = ('auto', KW)
        if op in ('cont32', 'fp32'): mp = None
        if op in ('cl', 'cl_bf16', 'cl_fp16', 'cl_kw', 'fp16', 'bf16', 'cont32', 'fp32'): fai.discard('MixedPrecision')
    return dict(n_cl=int(cl), n_mp=int(mp is not None), mode=mp and mp[0], scaler=mp and mp[1], fastai=sorted(fai),
                layout='cl' if cl else 'cf', named=True)


def test_every_order_ends_in_the_asked_state():
    "Every sequence of up to 2 calls from every start, and of 3 calls from a plain learner (4 x 110 + 1000)"
    n = 0
    for start in STARTS:
        for k in ((1, 2, 3) if start == '' else (1, 2)):
            for seq in itertools.product(OPS, repeat=k):
                assert state(run(start, seq)) == reference(start, seq), (start, seq)
                n += 1
    assert n == 4 * (10 + 100) + 1000


@pytest.mark.parametrize('start, seq', [
    ('', ('cl_noamp', 'cl')),       # fastai 2.8: returns None, no MixedPrecision
    ('', ('fp16', 'cl_bf16')),      # fastai 2.8: silently stays fp16
    ('fai_mp', ('cl_bf16',)),       # fastai's own MixedPrecision replaced by ours
    ('fai_cl', ('fp16', 'cont')),
    ('cbs', ('cl_kw', 'cont32')),
    ('', ('cl',)),                  # the default: 'auto', the precision that is fast on this machine
    ('fai_mp', ('cl_fp16',)),
], ids=lambda v: '>'.join(v) if isinstance(v, tuple) else v or 'plain')
def test_trains_in_the_asked_state(start, seq):
    learn = run(start, seq)
    expected = reference(start, seq)
    learn.add_cb(Dtypes())
    quiet_fit(learn, 1, 1e-2)
    assert state(learn) == expected
    mode = expected['mode'] and (decide_amp('cpu').precision if expected['mode'] == 'auto' else expected['mode'])
    assert mode is None or learn.mixed_precision.precision == mode  # 'auto': what it measured fastest here
    want = AMPMode(mode).dtype if mode not in (None, 'fp32') else torch.float32
    assert set(learn.dtypes.acts) == {want}                         # the convolution computed in the asked dtype
    assert set(learn.dtypes.preds) == {(torch.float32, False)}      # float32 predictions, autocast off outside the forward
    assert not torch.is_autocast_enabled('cpu')


def test_bad_calls_change_nothing():
    learn = run('fai_mp', ())
    before = state(learn)
    with pytest.raises(ValueError, match="amp_mode 'fp8' is not one of"): learn.to_channelslast(amp_mode='fp8')
    with pytest.raises(TypeError, match='unknown keyword'): learn.to_channelslast(init_scal=8.)
    with pytest.raises(ValueError, match='bf16 uses no scaler'): learn.to_channelslast(amp_mode='bf16', init_scale=8.)
    with pytest.raises(TypeError, match='use_amp must be True or False'): learn.to_channelslast(use_amp=1)
    with pytest.raises(TypeError, match='to_fp32 must be True or False'): learn.to_contiguous(to_fp32=1)
    with pytest.raises(ValueError, match='growth_factor must be'): learn.to_fp16(growth_factor=0.5)
    assert state(learn) == before


# ---------------------------------------------------------------------------------------------------------------
# Autocast never leaks
class Raiser(FaiCallback):
    order = 60
    def __init__(self, event, exc): self.event, self.exc = event, exc
    def __call__(self, event_name):
        if event_name == self.event and self.learn.training: raise self.exc
        return super().__call__(event_name)


class Boom(nn.Module):
    def __init__(self, exc): super().__init__(); self.exc = exc
    def forward(self, x):
        if self.training: raise self.exc
        return x


class InForward(nn.Module):
    "Records whether autocast is on inside the forward, where the model's last layer runs"
    def __init__(self): super().__init__(); self.seen = []
    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled('cpu'))
        return x


FAI_CANCELS = [getattr(fcore, n) for n in ('CancelFitException', 'CancelEpochException', 'CancelTrainException',
                                           'CancelValidException', 'CancelBatchException', 'CancelStepException',
                                           'CancelBackwardException')]


@pytest.mark.parametrize('where', ['model', 'after_pred', 'after_loss'])
@pytest.mark.parametrize('exc', FAI_CANCELS + [RuntimeError, KeyError, KeyboardInterrupt], ids=lambda c: c.__name__)
@pytest.mark.parametrize('mode', ['bf16', 'fp16'])
def test_no_autocast_leak(mode, exc, where):
    probe = InForward()
    body = nn.Sequential(tiny_cnn(), probe)
    model = nn.Sequential(body, Boom(exc())) if where == 'model' else body
    cbs = [] if where == 'model' else [Raiser(where, exc())]
    learn = learner(model, cbs=cbs, n=16)
    getattr(learn, f'to_{mode}')()
    try: quiet_fit(learn, 1)
    except BaseException: pass  # whether fastai's loop stops or goes on (its Recorder may fail on a batch without
                                # a loss) is fastai's business; the autocast state is ours
    assert probe.seen and all(probe.seen)  # autocast was on inside the forward...
    assert not torch.is_autocast_enabled('cpu')  # ...and is off now, whatever ended the batch
    assert learn.forward_context is contextlib.nullcontext and learn.fitting is False
    assert not learn.model._forward_pre_hooks and not learn.model._forward_hooks  # no hook left on the model


def test_no_leak_from_get_preds_and_a_get_preds_inside_a_fit_keeps_the_fit_in_autocast():
    probe = InForward()
    learn = learner(nn.Sequential(tiny_cnn(), probe)).to_bf16()
    with pytest.raises(RuntimeError, match='valid boom'):
        learn.get_preds(cbs=[_ValidRaiser()])
    assert not torch.is_autocast_enabled('cpu') and learn.forward_context is contextlib.nullcontext

    class PredsAtEpochEnd(FaiCallback):
        order = 70
        def after_train(self): self.learn.get_preds(dl=self.dls.valid)  # fastai's get_preds runs before/after_fit
    probe.seen.clear()
    quiet_fit(learn, 1, cbs=PredsAtEpochEnd())
    assert len(probe.seen) == 4 + 2 + 2 and all(probe.seen)  # train, get_preds, then validation: all in autocast


class _ValidRaiser(FaiCallback):
    order = 60
    def after_pred(self): raise RuntimeError('valid boom')


def test_our_cancel_exceptions_are_fastai_cancels_in_its_loop():
    "fastai's loop catches our cancel classes (MixedPrecision skips an fp16 step with ours) like its own"
    class SkipFirst(OurCallback):
        order = 60
        def __init__(self): super().__init__(); self.seen = []
        def after_loss(self):
            if self.learn.train_iter == 0: raise OurCancelBatch()
        def after_cancel_batch(self): self.seen.append(self.learn.train_iter)
    skip, steps = SkipFirst(), []
    learn = learner(cbs=[skip, _StepCounter(steps)])
    quiet_fit(learn, 1)
    assert skip.seen == [0] and steps == [1, 2, 3] and len(learn.recorder.values) == 1


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state, scaler state, save/load
@pytest.mark.parametrize('opt_func, keys, inner', [
    (FaiAdam, ('grad_avg', 'sqr_avg'), False),
    (partial(OptimWrapper, opt=torch.optim.Adam), ('exp_avg', 'exp_avg_sq'), True),
], ids=['fastai_Adam', 'OptimWrapper_Adam'])
def test_optimizer_state_follows_the_weights(opt_func, keys, inner):
    learn = learner(opt_func=opt_func)
    quiet_fit(learn, 1, 1e-2)
    st = lambda: (learn.opt.opt if inner else learn.opt).state[learn.model[0].weight]
    assert not any(is_cl(st()[k]) for k in keys)
    learn.to_channelslast(amp_mode='bf16')
    assert is_cl(learn.model[0].weight) and all(is_cl(st()[k]) for k in keys)  # at the call, before any fit
    quiet_fit(learn, 1, 1e-2)
    assert all(is_cl(st()[k]) for k in keys)
    learn.to_contiguous(to_fp32=True)
    assert all(st()[k].is_contiguous() and not is_cl(st()[k]) for k in keys)


class Overflow(FaiCallback):
    order = 20  # after MixedPrecision (10) scaled the loss
    def before_backward(self):
        if self.train_iter == 0: self.learn.loss_grad = self.learn.loss_grad * float('inf')


def test_scaler_state_across_fits_save_load_and_plain_fastai(tmp_path):
    learn = learner(path=tmp_path).to_fp16(init_scale=1024.)
    w_before = learn.model[0].weight.detach().clone()
    quiet_fit(learn, 1, 1e-2, cbs=Overflow())
    mp = learn.mixed_precision
    assert (mp.scaler.get_scale(), mp.skipped_steps) == (512., 1)
    scaler = mp.scaler
    quiet_fit(learn, 1, 1e-2)
    assert mp.scaler is scaler and mp.scaler.get_scale() == 512.  # fastai's own starts each fit at init_scale
    assert not torch.equal(w_before, learn.model[0].weight)
    file = learn.save('ck')
    assert file == tmp_path / 'models' / 'ck.pth'
    raw = torch.load(file, weights_only=False)
    assert set(raw) == {'model', 'opt'}  # fastai's own format
    assert raw['opt']['channelslast_cb']['mixed_precision']['scaler']['scale'] == 512.
    # fastai's own load_model (the function its Learner.load calls) reads it without a warning
    plain = learner(path=tmp_path)
    plain.create_opt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        flearner.load_model(file, plain.model, plain.opt)
    assert not [w for w in caught if 'optimizer' in str(w.message)]
    for a, b in zip(learn.model.state_dict().values(), plain.model.state_dict().values()): assert torch.equal(a, b)
    # and ours restores the scaler
    other = learner(path=tmp_path).to_fp16(init_scale=1024.).load('ck')
    quiet_fit(other, 1, 1e-2)
    assert other.mixed_precision.scaler.get_scale() == 512. and other.mixed_precision.skipped_steps == 1
    # with_opt=False writes fastai's bare model state, which loads too
    learn.save('bare', with_opt=False)
    assert 'model' not in torch.load(tmp_path / 'models' / 'bare.pth', weights_only=True)
    learner(path=tmp_path).load('bare', with_opt=False)


def test_save_load_with_fastai_ranger(tmp_path):
    "fastai's `ranger` (Lookahead over RAdam) writes fastai's optimizer format plus its own keys: it round-trips"
    from fastai.optimizer import ranger
    learn = learner(path=tmp_path, opt_func=ranger).to_fp16(init_scale=1024.)
    quiet_fit(learn, 1, 1e-2, cbs=Overflow())
    learn.save('ranger')
    other = learner(path=tmp_path, opt_func=ranger).to_fp16(init_scale=1024.).load('ranger')
    assert other.opt.count == learn.opt.count and other.mixed_precision.state_dict()['scaler']['scale'] == 512.
    w, w2 = learn.model[0].weight, other.model[0].weight
    torch.testing.assert_close(other.opt.state[w2]['sqr_avg'], learn.opt.state[w]['sqr_avg'], rtol=0, atol=0)
    with pytest.raises(ValueError, match="fastai's own Optimizer's, and this learner's optimizer is OptimWrapper"):
        learner(path=tmp_path, opt_func=partial(OptimWrapper, opt=torch.optim.SGD)).load('ranger')


def test_checkpoints_between_our_learner_and_fastais(tmp_path):
    ours = Learner(DataLoaders.from_tensors(synth_images(32), bs=8), tiny_cnn(), loss_func=F.cross_entropy,
                   opt_func=torch.optim.SGD, progress=False, path=tmp_path).to_fp16(init_scale=256.)
    ours.fit(1, 0.05)
    ours.save('ours')
    sgd = partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.))
    fai = learner(tiny_cnn(seed=1), opt_func=sgd, path=tmp_path).to_channelslast().load('ours')
    for a, b in zip(ours.model.state_dict().values(), fai.model.state_dict().values()): assert torch.equal(a, b)
    assert fai.mixed_precision.state_dict()['scaler']['scale'] == ours.mixed_precision.scaler.get_scale()
    with pytest.raises(ValueError, match=r"ours\.pth.*Load with with_opt=False"):
        learner(path=tmp_path).load('ours')  # fastai's Adam cannot read torch's SGD state: nothing loaded
    named = {**torch.load(tmp_path / 'models' / 'ours.pth', weights_only=True), 'opt_type': 'Adam'}
    torch.save(named, tmp_path / 'models' / 'named.pth')  # a checkpoint that names its optimizer (issue 13's format)
    with pytest.raises(ValueError, match="holds the state of a Adam optimizer, and this learner's is a SGD"):
        learner(path=tmp_path, opt_func=sgd).load('named')
    with pytest.raises(ValueError, match="not a checkpoint"):
        torch.save([1, 2], tmp_path / 'models' / 'list.pth')
        learner(path=tmp_path).load('list')
    # and a fastai file (torch optimizer, with_opt) loads into our Learner
    quiet_fit(fai, 1, 0.05)
    fai.save('fai')
    back = Learner(DataLoaders.from_tensors(synth_images(32), bs=8), tiny_cnn(seed=2), loss_func=F.cross_entropy,
                   opt_func=torch.optim.SGD, progress=False, path=tmp_path).load('fai')
    for a, b in zip(fai.model.state_dict().values(), back.model.state_dict().values()): assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Beside fastai's own tools
def test_fine_tune_get_preds_gradient_accumulation_save_model_beside_them(tmp_path):
    learn = learner(tiny_cnn(), path=tmp_path).to_channelslast(amp_mode='bf16')
    learn.add_cb(Dtypes())
    with learn.no_logging(): learn.fine_tune(1, freeze_epochs=1)
    assert set(learn.dtypes.acts) == {torch.bfloat16} and is_cl(learn.model[0].weight)
    # get_preds with fastai's default DataLoader (dls.valid.new): float32 predictions close to the fp32 model's
    preds, targs = learn.get_preds()
    assert preds.dtype == torch.float32 and preds.shape == (16, 2)
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(synth_images(16, seed=1)[0])  # F.cross_entropy: get_preds adds no activation
    torch.testing.assert_close(preds, ref, atol=0.05, rtol=0.02)  # bf16 against float32
    assert torch.equal(targs, synth_images(16, seed=1)[1])

    # GradientAccumulation (order 6, before MixedPrecision): fp16 steps only every n_acc samples, the scaler agrees
    steps = []
    counter = _StepCounter(steps)
    learn = learner(tiny_cnn(), path=tmp_path).to_channelslast()
    w0 = learn.model[0].weight.detach().clone()
    quiet_fit(learn, 1, 1e-2, cbs=[GradientAccumulation(n_acc=16), counter])
    assert len(steps) == 2 and not torch.equal(w0, learn.model[0].weight)  # 4 batches of 8, a step every 16 samples
    assert learn.mixed_precision.skipped_steps == 0

    # fastai's SaveModelCallback saves through our save and loads the best model back through our load
    save = SaveModelCallback(fname='best', with_opt=True)
    quiet_fit(learn, 2, 1e-2, cbs=save)
    state = torch.load(tmp_path / 'models' / 'best.pth', weights_only=False)
    assert set(state) == {'model', 'opt'} and 'mixed_precision' in state['opt']['channelslast_cb']
    for k, v in state['model'].items(): assert torch.equal(v, learn.model.state_dict()[k]), k
    assert is_cl(learn.model[0].weight)


class _StepCounter(FaiCallback):
    order = 70
    def __init__(self, steps): self.steps = steps
    def after_step(self): self.steps.append(self.train_iter)


def test_channels_last_auto_in_fastais_loop(capsys):
    cl = ChannelsLast(auto=True, warmup=1, block=1, rounds=2, drop=100.)  # 8 measuring steps: 2 epochs of 4 batches
    t = [0.]
    def clock():  # a fake step clock, contiguous 10% slower: the window runs whole (a real one could screen a layout out)
        t[0] += {'channels_last': 1., 'contiguous': 1.1}[cl.layout] / 2
        return t[0]
    cl._clock = clock
    learn = learner(cbs=[cl])
    msgs = lambda: [l for l in capsys.readouterr().out.splitlines() if 'ChannelsLast(auto)' in l]
    quiet_fit(learn, 1, 1e-2)  # printed, as fastai's own callbacks do (fastai's logger takes its progress table's rows)
    got = msgs()
    assert cl.decision is None and len(got) == 1 and 'the fit ended after 4 measuring steps, before the decision' in got[0], got
    learn.get_preds()          # a validation is not a fit: no "the fit ended" message
    assert msgs() == []
    quiet_fit(learn, 1, 1e-2)
    got = msgs()
    assert cl.decision is not None and cl.decision.steps == 8
    assert len(got) == 1 and f'ChannelsLast(auto): kept {cl.decision.setting} (' in got[0], got  # (after the progress bar)
    want = cl.decision.layout == 'channels_last'
    assert is_cl(learn.model[0].weight) == want
    assert learn.to_channelslast(auto=True, use_amp=False) is learn and learn.channels_last is cl  # kept, as asked


def test_device_is_where_the_model_is():
    "Our callbacks and to_* helpers read `learn.device`, as on our Learner; fastai's has none of its own"
    learn = learner()
    assert learn.device == torch.device('cpu')
    assert learner(nn.Sequential(nn.Flatten())).device == torch.device('cpu')  # no parameters: the dls' device
    with pytest.raises(AttributeError): learn.device = 'cuda'  # read-only: it follows the model


def test_layout_report_on_a_fastai_learner():
    learn = learner(tiny_cnn())
    assert learn.layout_report().amp is None
    report = learn.to_channelslast(amp_mode='bf16').layout_report(backward=True)
    assert report.amp == 'bf16' and report.breaks == [] and report.n_fwd_copies == 0
    fai = learner(tiny_cnn(), cbs=FaiMixedPrecision(amp_mode='bf16'))  # fastai's own: its mode is read too
    assert fai.layout_report().amp == 'bf16'


def test_unpatch_restores_fastais_methods(patched):
    own = {k: v for k, v in patched._ORIG.items()}
    patched.unpatch_fastai()
    try:
        for k, v in own.items():
            assert flearner.Learner.__dict__.get(k, patched._MISSING) is v, k
        learn = learner()
        assert learn.to_channelslast(use_amp=False).to_channelslast() is None  # fastai 2.8's own, wrong
        assert not hasattr(learn, 'device') and not hasattr(learn, 'forward_context')
    finally: patched.patch_fastai()
    assert flearner.Learner.to_channelslast is patched._OURS['to_channelslast']


# ---------------------------------------------------------------------------------------------------------------
# The fresh processes' results (last: they ran while the tests above did)
@pytest.mark.parametrize('name', ['ours_first', 'fastai_first'])
def test_import_before_or_after_fastai_vision_all(procs, name):
    rc, out, err = procs(name)
    assert rc == 0, err[-3000:]
    assert ("CBS ['channelslast_cb.channelslast.ChannelsLast', 'channelslast_cb.fp16.MixedPrecision']"
            in out.splitlines()), out


def test_channelslast_cb_works_without_fastai(procs):
    rc, out, err = procs('no_fastai')
    assert rc == 0, err[-3000:]
    assert 'IMPORT-ERROR' in out and 'fastai' in out.split('IMPORT-ERROR')[1] and out.strip().endswith('OK'), out


def test_fp16_decision_is_the_same_on_a_fastai_learner(procs):
    "MixedPrecision's CPU fp16 check runs at before_fit in fastai's loop and says what it says on our Learner"
    res = {k: procs(k) for k in ('ours_first', 'fp16_ours')}
    for k, (rc, out, err) in res.items(): assert rc == 0 and 'OK' in out.splitlines(), (k, err[-3000:])
    said = {k: sorted({re.sub(r'(at least )?\d+\.\d+', '#', l) for l in out.splitlines() if l.startswith('WARNING')})
            for k, (rc, out, err) in res.items()}
    assert said['ours_first'] == said['fp16_ours'], said
    import channelslast_cb.fp16 as fp16
    native = getattr(fp16, '_cpu_native', None) or getattr(fp16, 'cpu_native', None)
    if native is not None and native(torch.float16) is False:  # this CPU has no native float16: both must have warned about it
        assert any('fp16' in s for s in said['fp16_ours']), said



# ---------------------------------------------------------------------------------------------------------------
# Models a newcomer brings (issue 24): the same behaviour as on our Learner
def x_learner(model, x, cbs=None):
    "A fastai Learner on (x, y) batches of the 32 synthetic images, x transformed (spectrograms, uint8)"
    xs, y = synth_images(32)
    dls = FaiDataLoaders.from_dsets(TensorDataset(x(xs), y), TensorDataset(x(xs[:16]), y[:16]), bs=8, device='cpu')
    return flearner.Learner(dls, model, loss_func=F.cross_entropy, opt_func=FaiAdam, cbs=cbs)


def cl_warnings_of(f):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        f()
    return [str(o.message) for o in w if issubclass(o.category, ChannelsLastWarning)]


@pytest.mark.parametrize('how', ['cbs', 'to_channelslast'])
def test_a_model_without_convolutions_trains_untouched_said_once(how):
    torch.manual_seed(0)
    strides = []
    probe = FaiCallback()
    probe.before_batch = lambda: strides.append(probe.learn.xb[0].stride())
    learn = x_learner(ViewMLP(), lambda x: x, cbs=[ChannelsLast(), probe] if how == 'cbs' else [probe])
    if how == 'to_channelslast': learn.to_channelslast(use_amp=False)
    msgs = cl_warnings_of(lambda: (quiet_fit(learn, 1), quiet_fit(learn, 1)))
    assert len(msgs) == 1 and 'leaves the model and its batches exactly as they are' in msgs[0], msgs
    assert strides and set(strides) == {(192, 64, 8, 1)}
    assert not learn.model.mean.is_contiguous(memory_format=CL)


@pytest.mark.parametrize('model, x', [(Spectrogram, lambda x: x[:, 0]), (Uint8Net, as_uint8)], ids=['spectrogram', 'uint8'])
def test_no_warning_for_a_model_that_builds_its_own_images(model, x):
    torch.manual_seed(0)
    m, seen = model(), []
    record_c2(m, seen)
    learn = x_learner(m, x, cbs=ChannelsLast())
    assert cl_warnings_of(lambda: quiet_fit(learn, 1)) == []
    assert seen and set(seen) == {(True, True)}


def test_view_after_the_convolutions_says_where_and_what_to_change():
    learn = x_learner(LeNet(), lambda x: x, cbs=ChannelsLast())
    with pytest.raises(RuntimeError, match=r"a `\.view` met a channels-last tensor in module '\(the model\)' \(LeNet\), "
                                           r"at .*helpers\.py:\d+ in forward: x = x\.view\(-1, self\.n\)") as e:
        quiet_fit(learn, 1)
    assert 'Use `.flatten(1)` or `.reshape(...)` there' in str(e.value) and 'learn.to_contiguous()' in str(e.value)
    assert str(e.value).count('ChannelsLast:') == 1
    with pytest.raises(RuntimeError, match='met a channels-last tensor'):
        with learn.no_bar(): learn.get_preds()
    assert not torch.is_autocast_enabled('cpu')
    learn.to_contiguous()
    quiet_fit(learn, 1)


def test_a_float16_model_is_refused_and_to_fp32_makes_it_float32():
    learn = x_learner(tiny_cnn().half(), lambda x: x)
    with pytest.raises(ValueError, match=r"learn\.to_channelslast\(\): 8 of the model's 8 parameters are float16.*"
                                         r"learn\.to_fp32\(\) \(or learn\.model\.float\(\)\)"):
        learn.to_channelslast()
    assert not any(isinstance(cb, (ChannelsLast, MixedPrecision)) for cb in learn.cbs)
    with pytest.raises(ValueError, match=r"learn\.to_fp16\(\): 8 of the model's 8"): learn.to_fp16()
    learn.to_channelslast(use_amp=False).to_contiguous(to_fp32=True)
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    learn.model.half()
    learn.to_fp32()
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    learn.to_channelslast()
    quiet_fit(learn, 1)
