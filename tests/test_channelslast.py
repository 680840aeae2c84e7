"""`ChannelsLast`, `to_channels_last` and `Learner.to_channelslast`/`to_contiguous` (issue 4), on the CPU.

The state table covers the three user lines (`cbs=ChannelsLast()`, `learn.to_channelslast()`,
`learn.to_contiguous(to_fp32=True)`) and their variants in every order against each other and against
`to_fp16/to_bf16/to_fp32`, including the two orders that end wrong in fastai 2.8.
"""
import contextlib
import itertools
import re
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (LeNet, Spectrogram, Uint8Net, ViewMLP, as_uint8, record_c2, synth_images, tiny_cnn,
                     tiny_cnn_no_conv_bias)

from channelslast_cb.channelslast import (
    CHANNELS_LAST, ChannelsLast, ChannelsLastWarning, match_opt_state_layout, to_channels_last, to_contiguous_format)
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import AMPMode, MixedPrecision, decide_amp
from channelslast_cb.learner import DataLoaders, Learner

CL, CL3 = torch.channels_last, torch.channels_last_3d


cnn = tiny_cnn_no_conv_bias
# fp16 autocast measured slow on this CPU warns once (AMPSpeedWarning); it is still correct, and tiny here
pytestmark = pytest.mark.filterwarnings('ignore::channelslast_cb.fp16.AMPSpeedWarning')


def make_learner(model=None, cbs=None, n=32, bs=8, opt_func=torch.optim.AdamW, valid=True, **kwargs):
    dls = DataLoaders.from_tensors(synth_images(n), synth_images(16, seed=1) if valid else None, bs=bs, shuffle=False)
    return Learner(dls, cnn() if model is None else model, loss_func=F.cross_entropy, opt_func=opt_func,
                   cbs=cbs, progress=False, **kwargs)


def layout(t: torch.Tensor) -> str:
    "'cl' or 'cf' for a tensor whose shape is not ambiguous, else 'other'"
    cl = t.is_contiguous(memory_format=CL3 if t.dim() == 5 else CL)
    if cl and not t.is_contiguous(): return 'cl'
    if t.is_contiguous() and not cl: return 'cf'
    return 'other'


def model_layout(model: nn.Module) -> str:
    "'cl' / 'cf' when every 4-D/5-D parameter with an unambiguous shape has that layout, else 'mixed'"
    got = {layout(p) for p in model.parameters() if p.dim() in (4, 5)} - {'other'}
    return got.pop() if len(got) == 1 else 'mixed'


# ---------------------------------------------------------------------------------------------------------------
# The state table
DEF = dict(init_scale=2.**16, growth_factor=2., backoff_factor=.5, growth_interval=2000, enabled=True)
KW = {**DEF, 'init_scale': 1024., 'growth_interval': 10}

OPS = {  # name -> the call; 'cbs' is `Learner(..., cbs=ChannelsLast())` and can only come first
    'cl': lambda l: l.to_channelslast(),
    'cl_noamp': lambda l: l.to_channelslast(use_amp=False),
    'cl_bf16': lambda l: l.to_channelslast(amp_mode='bf16'),
    'cl_fp16': lambda l: l.to_channelslast(amp_mode='fp16'),
    'cl_kw': lambda l: l.to_channelslast(init_scale=1024., growth_interval=10),
    'cont': lambda l: l.to_contiguous(),
    'cont32': lambda l: l.to_contiguous(to_fp32=True),
    'fp16': lambda l: l.to_fp16(),
    'bf16': lambda l: l.to_bf16(),
    'fp32': lambda l: l.to_fp32(),
}


_DLS = DataLoaders.from_tensors(synth_images(16), synth_images(16, seed=1), bs=8, shuffle=False)  # stateless: shared


def run(seq):
    learn = Learner(_DLS, cnn(), loss_func=F.cross_entropy, cbs=ChannelsLast() if seq[0] == 'cbs' else None,
                    progress=False)
    for op in seq[1:] if seq[0] == 'cbs' else seq:
        assert OPS[op](learn) is learn, f"{op} did not return the learner"
    return learn


def state(learn):
    cls = [cb for cb in learn.cbs if isinstance(cb, ChannelsLast)]
    mps = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    mp = mps[0] if len(mps) == 1 else None
    return dict(n_cl=len(cls), n_mp=len(mps), mode=mp and mp.amp_mode.value, scaler=mp and mp.scaler_kwargs,
                layout=model_layout(learn.model))


def row(seq, n_cl, mode, scaler, lay):
    return pytest.param(seq, dict(n_cl=n_cl, n_mp=int(mode is not None), mode=mode, scaler=scaler, layout=lay),
                        id='>'.join(seq))


TABLE = [
    # the three user lines
    row(('cbs',), 1, None, None, 'cl'),
    row(('cl',), 1, 'auto', DEF, 'cl'),
    row(('cont32',), 0, None, None, 'cf'),
    row(('cbs', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cbs', 'cont32'), 0, None, None, 'cf'),
    row(('cl', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl', 'cont32'), 0, None, None, 'cf'),
    row(('cont32', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cbs', 'cl', 'cont32'), 0, None, None, 'cf'),
    row(('cbs', 'cont32', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl', 'cont32', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl', 'cont32', 'cont32'), 0, None, None, 'cf'),
    # fastai 2.8 ends wrong on these two (no MixedPrecision and None; silently fp16)
    row(('cl_noamp', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('fp16', 'cl_bf16'), 1, 'bf16', {}, 'cl'),
    # use_amp=False leaves the precision alone
    row(('cl_noamp',), 1, None, None, 'cl'),
    row(('fp16', 'cl_noamp'), 1, 'fp16', DEF, 'cl'),
    row(('bf16', 'cl_noamp'), 1, 'bf16', {}, 'cl'),
    row(('cl_kw', 'cl_noamp'), 1, 'auto', KW, 'cl'),
    row(('cl_bf16', 'cl_noamp'), 1, 'bf16', {}, 'cl'),
    # use_amp=True asks for exactly this precision
    row(('bf16', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl_kw',), 1, 'auto', KW, 'cl'),
    row(('cl_kw', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl', 'cl_kw'), 1, 'auto', KW, 'cl'),
    row(('cl_bf16', 'cl'), 1, 'auto', DEF, 'cl'),
    row(('cl', 'cl_bf16'), 1, 'bf16', {}, 'cl'),
    row(('cl', 'cl_fp16'), 1, 'fp16', DEF, 'cl'),      # a mode asked for by name is honoured
    row(('cl_fp16', 'cl'), 1, 'auto', DEF, 'cl'),      # and the default is 'auto' again
    row(('cl_fp16', 'cl_noamp'), 1, 'fp16', DEF, 'cl'),
    # the precision helpers after to_channelslast change the precision only
    row(('cl', 'bf16'), 1, 'bf16', {}, 'cl'),
    row(('cl', 'fp32'), 1, None, None, 'cl'),
    row(('cl', 'fp16'), 1, 'fp16', DEF, 'cl'),
    row(('cbs', 'fp16'), 1, 'fp16', DEF, 'cl'),
    # to_contiguous() keeps the precision, to_contiguous(to_fp32=True) drops it
    row(('cont',), 0, None, None, 'cf'),
    row(('cl', 'cont'), 0, 'auto', DEF, 'cf'),
    row(('cbs', 'bf16', 'cont'), 0, 'bf16', {}, 'cf'),
    row(('cbs', 'bf16', 'cont32'), 0, None, None, 'cf'),
    row(('cl', 'cont', 'cl_noamp'), 1, 'auto', DEF, 'cl'),
    row(('fp32', 'cl_bf16', 'fp16', 'cont'), 0, 'fp16', DEF, 'cf'),
    row(('cbs', 'cl_noamp', 'cl_bf16', 'cont32', 'cl_noamp'), 1, None, None, 'cl'),
]


@pytest.mark.parametrize('seq, expected', TABLE)
def test_state_table(seq, expected):
    learn = run(seq)
    assert state(learn) == expected
    learn.fit(1)  # and it trains in that state, keeping it
    assert state(learn) == expected
    if expected['mode']:  # the mode really took effect: the first convolution computes in the 16-bit type
        mp = learn.mixed_precision  # ('auto': decided on the fit's first steps, or float32 at once where nothing is timed)
        want = mp.precision if expected['mode'] == 'auto' else expected['mode']
        assert want in ('fp32', 'bf16', 'fp16') and mp.precision == want
        seen = []
        h = learn.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        learn.validate()
        h.remove()
        assert seen[0] == (torch.float32 if want == 'fp32' else AMPMode(want).dtype)


def reference(seq):
    "What each call asks for, as a tiny state machine: (ChannelsLast attached, MixedPrecision (mode, settings), layout)"
    cl, mp = False, None
    for op in seq:
        if op in ('cbs', 'cl', 'cl_noamp', 'cl_bf16', 'cl_fp16', 'cl_kw'): cl = True
        if op in ('cont', 'cont32'): cl = False
        if op == 'cl': mp = ('auto', DEF)  # the default amp_mode: the precision that is fast on this machine
        if op in ('fp16', 'cl_fp16'): mp = ('fp16', DEF)
        if op in ('cl_bf16', 'bf16'): mp = ('bf16', {})
        if op == 'cl_kw': mp = ('auto', KW)
        if op in ('cont32', 'fp32'): mp = None
    return dict(n_cl=int(cl), n_mp=int(mp is not None), mode=mp and mp[0], scaler=mp and mp[1],
                layout='cl' if cl else 'cf')


def test_every_order_up_to_three_calls():
    "All 2 x (10 + 100 + 1000) sequences: each ends in the state its last calls ask for, with one of each callback at most"
    names = list(OPS)
    n = 0
    for k in (1, 2, 3):
        for seq in itertools.product(names, repeat=k):
            for start in ((), ('cbs',)):
                s = start + seq
                assert state(run(s)) == reference(s), s
                n += 1
    assert n == 2 * (10 + 100 + 1000)


def test_matching_mixed_precision_is_kept_other_replaced():
    learn = make_learner().to_fp16(init_scale=1024., growth_interval=10)
    mp = learn.mixed_precision
    learn.to_channelslast(amp_mode='fp16', init_scale=1024., growth_interval=10)
    assert learn.mixed_precision is mp  # same settings: kept, with its warmed-up scaler
    learn.to_channelslast(use_amp=False)
    assert learn.mixed_precision is mp
    learn.to_channelslast()
    assert learn.mixed_precision is not mp and learn.mixed_precision.scaler_kwargs == DEF


def test_extra_callbacks_are_collapsed():
    learn = make_learner(cbs=[ChannelsLast(), ChannelsLast(), MixedPrecision('bf16'), MixedPrecision('fp16')])
    learn.to_channelslast(amp_mode='bf16')
    assert state(learn) == dict(n_cl=1, n_mp=1, mode='bf16', scaler={}, layout='cl')
    assert learn.channels_last in learn.cbs and learn.mixed_precision in learn.cbs


BAD = [
    (dict(amp_mode='fp8'), ValueError, "amp_mode 'fp8' is not one of 'fp16', 'bf16', 'auto'"),
    (dict(amp_mode=None), ValueError, "is not one of 'fp16', 'bf16', 'auto'"),
    (dict(amp_mode='bf16', init_scale=1024.), ValueError, 'bf16 uses no scaler'),
    (dict(amp_mode='bf16', enabled=False), ValueError, 'bf16 uses no scaler'),
    (dict(init_scael=1024.), TypeError, 'Did you mean init_scale'),
    (dict(device='cpu'), TypeError, "unknown keyword(s) 'device'"),
    (dict(use_amp=False, growth_interval=10), ValueError, 'cannot take effect'),
    (dict(growth_factor=.5), ValueError, 'growth_factor must be a number > 1'),
    (dict(init_scale=-1.), ValueError, 'init_scale must be a finite number > 0'),
    (dict(use_amp='yes'), TypeError, 'use_amp must be True or False'),
    (dict(auto=1), TypeError, 'auto must be True or False'),
]


@pytest.mark.parametrize('start', ['plain', 'cl_fp16', 'cl_auto_bf16'])
@pytest.mark.parametrize('kwargs, exc, msg', BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_changes_nothing(start, kwargs, exc, msg):
    learn = make_learner()
    if start == 'cl_fp16': learn.to_channelslast(init_scale=256.)
    if start == 'cl_auto_bf16': learn.to_channelslast(amp_mode='bf16', auto=True)
    before, lay = list(learn.cbs), model_layout(learn.model)
    mp = getattr(learn, 'mixed_precision', None)
    with pytest.raises(exc, match=None) as e: learn.to_channelslast(**kwargs)
    assert msg in str(e.value)
    assert learn.cbs == before and model_layout(learn.model) == lay
    assert getattr(learn, 'mixed_precision', None) is mp


def test_to_contiguous_bad_input():
    learn = make_learner().to_channelslast()
    before = list(learn.cbs)
    with pytest.raises(TypeError, match='to_fp32 must be True or False'): learn.to_contiguous(to_fp32='yes')
    assert learn.cbs == before and model_layout(learn.model) == 'cl'


def test_channelslast_constructor_checks():
    with pytest.raises(TypeError, match='auto must be True or False'): ChannelsLast(auto='no')
    with pytest.raises(ValueError, match='block must be an integer >= 1'): ChannelsLast(auto=True, block=0)
    with pytest.raises(ValueError, match='warmup must be an integer >= 0'): ChannelsLast(auto=True, warmup=-1)
    with pytest.raises(TypeError, match='its own before_batch'): ChannelsLast(auto=True, before_batch=lambda cb: None)
    seen = []
    learn = make_learner(cbs=ChannelsLast(after_fit=lambda cb: seen.append('after_fit')))  # any event as a keyword
    learn.fit(1)
    assert seen == ['after_fit']


@pytest.mark.filterwarnings('ignore:.*chained_assignment')  # fastai's import-time pandas option (pandas 3)
def test_fastai_ends_wrong_in_the_two_orders():
    "The prose's claim about fastai 2.8, checked against fastai itself (the same two orders pass above)"
    fastai_learner = pytest.importorskip('fastai.learner', reason='fastai is not installed')
    from fastai.callback.channelslast import ChannelsLast as FaiChannelsLast  # noqa: F401 (patches Learner)
    from fastai.callback.fp16 import MixedPrecision as FaiMP
    from fastai.data.core import DataLoaders as FaiDLs
    from torch.utils.data import DataLoader, TensorDataset

    def fai():
        ds = TensorDataset(*synth_images(16))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return fastai_learner.Learner(FaiDLs(DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)),
                                          tiny_cnn(), loss_func=nn.CrossEntropyLoss())
    ours = sys.modules.get('channelslast_cb.fastai')   # an earlier test imported it: fastai's own methods for now
    if ours: ours.unpatch_fastai()
    try:
        learn = fai()
        learn.to_channelslast(use_amp=False)
        assert learn.to_channelslast() is None and not any(isinstance(cb, FaiMP) for cb in learn.cbs)
        learn = fai()
        learn.to_fp16()
        learn.to_channelslast(amp_mode='bf16')
        assert [cb.amp_mode.value for cb in learn.cbs if isinstance(cb, FaiMP)] == ['fp16']
    finally:
        if ours: ours.patch_fastai()


# ---------------------------------------------------------------------------------------------------------------
# Conversion functions
def test_batch_conversion_rules():
    x, y = synth_images(4)
    v = torch.randn(4, 2, 3, 5, 5)
    batch = OrderedDict(img=x, nested=[(x.double(), v), {'half': x.half()}], mask=x.long(), y=y, flat=x.flatten(1),
                        text='keep', none=None)
    out = to_channels_last(batch)
    assert type(out) is OrderedDict and list(out) == list(batch)
    assert layout(out['img']) == 'cl' and layout(out['nested'][0][0]) == 'cl' and layout(out['nested'][1]['half']) == 'cl'
    assert layout(out['nested'][0][1]) == 'cl' and out['nested'][0][1].is_contiguous(memory_format=CL3)
    assert type(out['nested']) is list and type(out['nested'][0]) is tuple
    assert out['mask'] is batch['mask'] and out['y'] is y and out['flat'] is batch['flat']
    assert out['text'] == 'keep' and out['none'] is None
    assert layout(batch['img']) == 'cf'  # the input batch is not modified
    assert torch.equal(out['img'], x)
    back = to_contiguous_format(out)
    assert layout(back['img']) == 'cf' and layout(back['nested'][0][1]) == 'cf' and torch.equal(back['img'], x)
    xc = out['img']
    assert to_channels_last(xc) is xc and to_channels_last((xc, y))[0] is xc  # already channels-last: no copy


def test_model_conversion_keeps_parameters_and_converts_grads_and_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(4, 4, 1), nn.Linear(2, 2))
    model.register_buffer('grid', torch.randn(1, 2, 3, 3))
    model[0](torch.randn(2, 3, 5, 5)).sum().backward()
    ids = [id(p) for p in model.parameters()]
    vals = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=.1)
    assert to_channels_last(model) is model
    assert [id(p) for p in model.parameters()] == ids and all(torch.equal(a, b) for a, b in zip(vals, model.parameters()))
    assert layout(model[0].weight) == 'cl' and layout(model[0].weight.grad) == 'cl' and layout(model.grid) == 'cl'
    assert model[1].weight.is_contiguous(memory_format=CL3) and model[1].weight.stride() == (4, 1, 4, 4, 4)
    opt.step()  # the optimizer built before still updates the model's own weights
    assert not torch.equal(model[0].weight, vals[0])
    to_contiguous_format(model)
    assert all(p.stride() == torch.empty(p.shape).stride() for p in model.parameters()) and layout(model.grid) == 'cf'


def test_match_opt_state_layout_sgd_momentum():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=.1, momentum=.9)
    F.cross_entropy(model(synth_images(4)[0]), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    buf = opt.state[model[0].weight]['momentum_buffer'].clone()
    to_channels_last(model)
    assert match_opt_state_layout(opt) is opt
    new = opt.state[model[0].weight]['momentum_buffer']
    assert layout(new) == 'cl' and torch.equal(new, buf)
    assert match_opt_state_layout(object()) is not None  # an optimizer without state: nothing to do


# ---------------------------------------------------------------------------------------------------------------
# The callback in a fit
def test_probe_after_pred_sees_converted_inputs_and_untouched_targets():
    "Fully convolutional model, 4-D float target (segmentation-like): inputs and outputs channels-last, target as it came"
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    x, y = torch.randn(16, 3, 6, 6), torch.randn(16, 2, 6, 6)
    seen = []

    def probe(cb):
        seen.append((cb.training, layout(cb.xb[0]), layout(cb.pred), layout(cb.yb[0]), cb.yb[0].clone()))
    learn = Learner(DataLoaders.from_tensors((x, y), (x[:8], y[:8]), bs=8, shuffle=False), seg, loss_func=F.mse_loss,
                    cbs=[ChannelsLast(), Callback(after_pred=probe)], progress=False)
    assert learn.cbs[-1].order > learn.channels_last.order
    learn.fit(1)
    assert [s[:4] for s in seen] == [(True, 'cl', 'cl', 'cf')] * 2 + [(False, 'cl', 'cl', 'cf')]
    assert torch.equal(seen[0][4], y[:8]) and torch.equal(seen[1][4], y[8:])  # values untouched too


def test_probe_classifier_integer_targets():
    seen = []
    learn = make_learner(cbs=[ChannelsLast(), Callback(after_pred=lambda cb: seen.append((layout(cb.xb[0]), cb.yb[0])))])
    learn.fit(1)
    assert {s[0] for s in seen} == {'cl'}
    assert all(s[1].dtype == torch.int64 and s[1].dim() == 1 for s in seen)


def test_conv3d_model_trains_in_channels_last_3d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 1),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(8, 2, 4, 6, 6)
    y = (x.mean((1, 2, 3, 4)) > 0).long()
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(conv_out=o.is_contiguous(memory_format=CL3)))
    learn = Learner(DataLoaders.from_tensors((x, y), bs=4, shuffle=False), model, loss_func=F.cross_entropy,
                    cbs=[ChannelsLast(), Callback(after_pred=lambda cb: seen.setdefault('xb', layout(cb.xb[0])))],
                    progress=False)
    w0 = model[0].weight.detach().clone()
    learn.fit(1)
    assert seen == {'conv_out': True, 'xb': 'cl'}
    assert model[0].weight.is_contiguous(memory_format=CL3) and layout(model[0].weight) == 'cl'
    assert not torch.equal(model[0].weight, w0) and all(torch.isfinite(torch.tensor(learn.recorder.losses)))
    exp_avg = learn.opt.state[model[0].weight]['exp_avg']
    assert layout(exp_avg) == 'cl'


def weights_after(cbs, opt_func=torch.optim.AdamW, epochs=2):
    learn = make_learner(cbs=cbs, opt_func=opt_func)
    learn.fit(epochs)
    return learn, [p.detach().contiguous() for p in learn.model.parameters()]


@pytest.mark.parametrize('opt_func', [torch.optim.AdamW, torch.optim.SGD])
def test_training_with_channelslast_equals_training_without(opt_func):
    plain, w_plain = weights_after(None, opt_func)
    cl, w_cl = weights_after(ChannelsLast(), opt_func)
    assert model_layout(cl.model) == 'cl' and model_layout(plain.model) == 'cf'
    for a, b in zip(w_plain, w_cl): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(plain.recorder.losses), torch.tensor(cl.recorder.losses), rtol=1e-4, atol=1e-5)


def test_to_contiguous_keeps_exact_weights_and_makes_adam_moments_contiguous():
    learn = make_learner().to_channelslast(use_amp=False)
    learn.fit(1)
    w = learn.model[0].weight
    st = learn.opt.state[w]
    assert layout(st['exp_avg']) == 'cl' and layout(st['exp_avg_sq']) == 'cl'
    vals = {k: v.clone() for k, v in learn.model.state_dict().items()}
    moms = {k: v.clone() for k, v in st.items()}
    assert learn.to_contiguous() is learn
    assert all(torch.equal(vals[k], v) for k, v in learn.model.state_dict().items())  # bitwise
    assert learn.model[0].weight is w  # same Parameter
    assert all(p.stride() == torch.empty(p.shape).stride() for p in learn.model.parameters())
    st = learn.opt.state[w]
    assert layout(st['exp_avg']) == 'cf' and layout(st['exp_avg_sq']) == 'cf'
    assert all(torch.equal(moms[k], v) for k, v in st.items())
    learn.fit(1)  # and trains on, contiguous
    assert model_layout(learn.model) == 'cf' and layout(learn.opt.state[w]['exp_avg']) == 'cf'


def test_checkpoint_from_channelslast_loads_into_both_layouts(tmp_path):
    learn = make_learner().to_channelslast(use_amp=False)
    learn.fit(1)
    f = learn.save(tmp_path / 'cl.pth')
    assert f.exists()
    saved = torch.load(f, weights_only=True)
    assert all(t.is_contiguous() for t in saved['model'].values())
    plain = make_learner(model=cnn(seed=1)).load(f)
    cl = make_learner(model=cnn(seed=1)).to_channelslast(use_amp=False).load(f)
    ref = learn.model.state_dict()
    for other in (plain, cl):
        assert all(torch.equal(ref[k], v) for k, v in other.model.state_dict().items())
    assert model_layout(plain.model) == 'cf' and model_layout(cl.model) == 'cl'
    # both train on from the checkpoint to the same weights; the loaded optimizer state follows the model's layout
    for l in (learn, plain, cl): l.fit(1)
    assert layout(cl.opt.state[cl.model[0].weight]['exp_avg']) == 'cl'
    assert layout(plain.opt.state[plain.model[0].weight]['exp_avg']) == 'cf'
    for a, b, c in zip(learn.model.parameters(), plain.model.parameters(), cl.model.parameters()):
        torch.testing.assert_close(a.contiguous(), b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.contiguous(), b, rtol=1e-4, atol=1e-5)
    preds, _ = cl.get_preds()
    assert preds.is_contiguous() and preds.view(-1).shape == (32,)


# ---------------------------------------------------------------------------------------------------------------
# Warnings where channels-last cannot help
def cl_warnings(learn, fits=2):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        for _ in range(fits): learn.fit(1)
    return [str(o.message) for o in w if issubclass(o.category, ChannelsLastWarning)]


def flat_learner(model):
    x, y = synth_images(32)
    return Learner(DataLoaders.from_tensors((x.flatten(1), y), bs=8), model, loss_func=F.cross_entropy,
                   cbs=ChannelsLast(), progress=False)


def test_a_model_without_convolutions_is_left_as_it_is_and_said_once():
    "issue 24.1: an MLP that `.view`s its image batch trains; the model (a 4-D buffer) and every batch stay as they came"
    torch.manual_seed(0)
    model, strides = ViewMLP(), []
    x, y = synth_images(32)
    learn = Learner(DataLoaders.from_tensors((x, y), bs=8), model, loss_func=F.cross_entropy, progress=False,
                    cbs=[ChannelsLast(), Callback(before_batch=lambda cb: strides.append(cb.xb[0].stride()))])
    assert learn.model.mean.is_contiguous() and not learn.model.mean.is_contiguous(memory_format=CL)
    msgs = cl_warnings(learn)  # two fits
    assert len(msgs) == 1, msgs
    assert 'has no 2-D or 3-D convolution' in msgs[0] and 'leaves the model and its batches exactly as they are' in msgs[0]
    assert 'learn.to_contiguous()' in msgs[0]
    assert set(strides) == {x[:8].stride()} and len(strides) == 8
    assert not learn.model.mean.is_contiguous(memory_format=CL)
    learn.to_channelslast(use_amp=False)  # the helper leaves it alone too
    assert not learn.model.mean.is_contiguous(memory_format=CL)
    learn.fit(1)


def test_a_model_replaced_by_a_conv_model_is_converted_again():
    learn = flat_learner(nn.Sequential(nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert len(cl_warnings(learn, fits=1)) == 1
    learn.model, learn.dls = cnn(), make_learner().dls
    assert cl_warnings(learn, fits=1) == []
    assert model_layout(learn.model) == 'cl'


def test_a_functional_convolution_counts_as_a_convolution():
    class FConv(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.randn(4, 3, 3, 3)); self.fc = nn.Linear(4, 2)
        def forward(self, x): return self.fc(F.conv2d(x, self.w, padding=1).mean((2, 3)))
    learn = make_learner(FConv(), cbs=ChannelsLast())
    assert cl_warnings(learn, fits=1) == [] and layout(learn.model.w) == 'cl'


@pytest.mark.parametrize('model, x', [(Spectrogram, lambda x: x[:, 0]), (Uint8Net, as_uint8),
                                      (lambda: nn.Sequential(nn.Unflatten(1, (3, 8, 8)), tiny_cnn()), lambda x: x.flatten(1))],
                         ids=['spectrogram', 'uint8', 'unflatten'])
def test_no_warning_for_a_conv_model_that_builds_its_own_images(model, x):
    "issue 24.3: its convolutions run channels-last (the weights are), so 'cannot make training faster' would be wrong"
    torch.manual_seed(0)
    m, seen = model(), []
    if hasattr(m, 'c2'): record_c2(m, seen)
    xs, y = synth_images(32)
    learn = Learner(DataLoaders.from_tensors((x(xs), y), bs=8), m, loss_func=F.cross_entropy, cbs=ChannelsLast(),
                    progress=False)
    assert cl_warnings(learn) == []
    assert seen == [] or set(seen) == {(True, True)}


def test_no_warning_for_a_conv_model_on_images():
    assert cl_warnings(make_learner(cbs=ChannelsLast())) == []


# ---------------------------------------------------------------------------------------------------------------
# A `.view` after the convolutions (issue 24.2)
def test_view_after_the_convolutions_says_where_and_what_to_change():
    learn = make_learner(LeNet(), cbs=ChannelsLast())
    with pytest.raises(RuntimeError, match='view size is not compatible') as e:
        learn.fit(1)
    msg = str(e.value)
    assert "a `.view` met a channels-last tensor in module '(the model)' (LeNet)" in msg, msg
    assert 'helpers.py:' in msg and 'x = x.view(-1, self.n)' in msg, msg
    assert 'Use `.flatten(1)` or `.reshape(...)` there' in msg and 'learn.to_contiguous()' in msg, msg
    assert msg.count('ChannelsLast:') == 1  # said once, by one host
    assert not torch.is_autocast_enabled('cpu')
    # validate and get_preds say the same; the learner is left usable both ways
    with pytest.raises(RuntimeError, match="met a channels-last tensor in module"): learn.validate()
    with pytest.raises(RuntimeError, match="met a channels-last tensor in module"): learn.get_preds()
    learn.to_contiguous().fit(1)


def test_view_inside_a_submodule_is_named():
    class Head(nn.Module):
        def forward(self, x): return x.view(x.size(0), -1)
    learn = make_learner(nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), Head(), nn.Linear(128, 2)), cbs=ChannelsLast())
    with pytest.raises(RuntimeError, match=r"in module '1' \(Head\), at .*return x\.view\(x\.size\(0\), -1\)"):
        learn.fit(1)


def test_other_errors_and_contiguous_runs_are_not_annotated():
    class Boom(nn.Module):
        def forward(self, x): raise RuntimeError('boom.')
    with pytest.raises(RuntimeError, match=r'^boom\.$'):
        make_learner(nn.Sequential(nn.Conv2d(3, 2, 1), Boom()), cbs=ChannelsLast()).fit(1)
    class OwnView(nn.Module):  # a channels-last tensor of its own, without the callback: torch's error as it is
        def forward(self, x): return x.contiguous(memory_format=CL).view(x.size(0), -1)
    with pytest.raises(RuntimeError, match=r'Use \.reshape\(\.\.\.\) instead\.$'):
        make_learner(nn.Sequential(nn.Conv2d(3, 2, 1), OwnView(), nn.Linear(128, 2))).fit(1)


# ---------------------------------------------------------------------------------------------------------------
# A float16 model (issue 24.4)
def half_learner():
    "A learner whose model (and Adam state) became float16 after a fit, as after loading a half checkpoint"
    learn = make_learner(tiny_cnn())
    learn.fit(1)
    learn.model.half()
    for st in learn.opt.state.values():
        for k, v in st.items():
            if v.dim(): st[k] = v.half()
    return learn


@pytest.mark.parametrize('call, name', [(lambda l: l.to_channelslast(), 'learn.to_channelslast()'),
                                        (lambda l: l.to_channelslast(amp_mode='bf16'), 'learn.to_channelslast()'),
                                        (lambda l: l.to_fp16(), 'learn.to_fp16()'),
                                        (lambda l: l.to_bf16(), 'learn.to_bf16()')])
def test_mixed_precision_refuses_a_float16_model_at_the_call(call, name):
    learn = half_learner()
    cbs = list(learn.cbs)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: 8 of the model's 8 parameters are float16 \(first: '0.weight'\)"
                                         r".*learn\.to_fp32\(\) \(or learn\.model\.float\(\)\)"):
        call(learn)
    assert learn.cbs == cbs and learn.model[0].weight.dtype == torch.float16 and model_layout(learn.model) == 'cf'


def test_use_amp_false_refuses_only_when_a_mixed_precision_is_attached():
    learn = half_learner().to_channelslast(use_amp=False)  # no mixed precision: the half model as it is
    assert model_layout(learn.model) == 'cl'
    learn.to_fp32().to_bf16()
    learn.model.half()
    with pytest.raises(ValueError, match='with the MixedPrecision already attached'):
        learn.to_channelslast(use_amp=False)


@pytest.mark.parametrize('back', ['to_contiguous', 'to_fp32'])
def test_back_to_full_precision_makes_float16_weights_float32(back):
    learn = half_learner().to_channelslast(use_amp=False)
    learn.to_contiguous(to_fp32=True) if back == 'to_contiguous' else learn.to_fp32()
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    assert {b.dtype for b in learn.model.buffers() if b.is_floating_point()} == {torch.float32}
    assert {v.dtype for st in learn.opt.state.values() for v in st.values() if v.dim()} == {torch.float32}
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    learn.fit(1)
    learn.to_channelslast().fit(1)  # and mixed precision is welcome again
    assert learn.model[0].weight.dtype == torch.float32


def test_to_fp32_keeps_float64_and_integer_tensors():
    learn = make_learner(cnn().double())
    learn.to_fp32()
    assert learn.model[0].weight.dtype == torch.float64 and learn.model[1].num_batches_tracked.dtype == torch.int64


def test_a_half_model_with_mixed_precision_alone_is_refused_before_the_first_batch():
    "cbs=[MixedPrecision('bf16')] on a .half() model: a clear error at the fit's start, and nothing left in force"
    from channelslast_cb.fp16 import MixedPrecision
    learn = Learner(DataLoaders.from_tensors(synth_images(16), bs=8), tiny_cnn().half(), loss_func=F.cross_entropy,
                    cbs=MixedPrecision('bf16'), progress=False)
    with pytest.raises(ValueError, match=r"MixedPrecision: \d+ of the model's \d+ parameters are float16 .*learn.to_fp32\(\)"):
        learn.fit(1)
    assert learn.forward_context is contextlib.nullcontext
    learn.to_fp32()
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
