"""`Learner.compile()`: graph counts across fits and validation, results equal to eager, clean checkpoints, layout
changes, the automatic layout choice, mixed precision, DDP and bad input.

Most tests compile with `Recording`, a real `torch.compile` backend (dynamo traces the model into FX graphs as for
`inductor`) that records each graph and the layout of its 4-D inputs, then runs it as traced; it counts graphs
without waiting for code generation. `test_inductor_*` compile with the default `inductor` backend.
"""
import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.audit import layout_report  # noqa: F401  (patches Learner.layout_report)
from channelslast_cb.channelslast import CHANNELS_LAST, CONTIGUOUS, ChannelsLast
from channelslast_cb.compile import TorchCompile, compile_unavailable, model_layout
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn, tiny_cnn_no_conv_bias


class Recording:
    "A torch.compile backend: records each graph and the layout of its 4-D inputs (weights, images), runs it as traced"
    def __init__(self): self.graphs = []

    def __call__(self, gm, example_inputs):
        four = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4]
        cl = all(t.is_contiguous(memory_format=torch.channels_last) for t in four)
        self.graphs.append(CHANNELS_LAST if cl else CONTIGUOUS)
        return gm.forward


def make_learner(cbs=None, seed=0, size=8, n=48, bs=8, model=tiny_cnn, **kw):
    x, y = synth_images(n + 16, size=size, seed=seed)
    dls = DataLoaders.from_tensors((x[:n], y[:n]), (x[n:], y[n:]), bs=bs, shuffle=False)
    return Learner(dls, model(seed=seed), loss_func=F.cross_entropy, lr=1e-2, cbs=cbs, progress=False, **kw)


def quiet(f, *args, **kw):
    "Call `f`, returning what it printed"
    out = io.StringIO()
    with contextlib.redirect_stdout(out): f(*args, **kw)
    return out.getvalue()


def params(learn): return [p.detach().clone() for p in learn.model.parameters()]


def assert_close_params(a, b, atol=1e-5):
    for p, q in zip(params(a), params(b)): torch.testing.assert_close(p, q, atol=atol, rtol=1e-4)


# --- graph counts ---------------------------------------------------------------------------------------------

def test_fit_fit_validate_get_preds_compile_two_graphs():
    rec = Recording()
    learn = make_learner(cbs=ChannelsLast()).compile(backend=rec)
    learn.fit(2)
    assert rec.graphs == [CHANNELS_LAST, CHANNELS_LAST]  # training graph, validation graph
    learn.fit(1); learn.fit_one_cycle(1); learn.validate(); learn.get_preds(with_loss=True)
    assert len(rec.graphs) == 2
    assert learn.torch_compile.layouts == [CHANNELS_LAST]


def test_compile_again_with_the_same_keywords_keeps_the_graphs():
    rec = Recording()
    learn = make_learner().compile(backend=rec)
    learn.fit(1)
    cb = learn.torch_compile
    assert learn.compile(backend=rec) is learn and learn.torch_compile is cb
    learn.fit(1)
    assert len(rec.graphs) == 2
    learn.compile(backend=rec, dynamic=False)  # other keywords: a new callback, new graphs
    assert learn.torch_compile is not cb and sum(isinstance(c, TorchCompile) for c in learn.cbs) == 1
    learn.fit(1)
    assert len(rec.graphs) == 4


def test_each_learner_has_its_own_recompile_budget():
    # nn.Module.compile() compiles nn.Module._call_impl, one code object for every module: dynamo's recompile limit
    # (8 per code object) would make the fifth such model run eagerly. Each TorchCompile has its own code object.
    recs = []
    for seed in range(5):
        rec = Recording(); recs.append(rec)
        make_learner(seed=seed).compile(backend=rec).fit(1)
    assert [len(r.graphs) for r in recs] == [2] * 5


def test_last_smaller_batch_compiles_once_more():
    rec = Recording()
    learn = make_learner(n=44).compile(backend=rec)  # 5 full batches of 8, then one of 4
    learn.fit(2)
    assert len(rec.graphs) == 3  # training (static), training with a dynamic batch size, validation
    learn.fit(1)
    assert len(rec.graphs) == 3


# --- layout changes and the automatic choice ------------------------------------------------------------------

def test_to_contiguous_after_compile_recompiles_once_and_says_so():
    rec = Recording()
    learn = make_learner(cbs=ChannelsLast()).compile(backend=rec)
    learn.fit(1)
    out = quiet(learn.to_contiguous().fit, 1)
    assert 'the model is contiguous now, channels_last when it was compiled' in out
    assert rec.graphs == [CHANNELS_LAST] * 2 + [CONTIGUOUS] * 2
    assert all(p.is_contiguous() for p in learn.model.parameters())
    assert 'compiles its graphs once more' not in quiet(learn.fit, 1)
    out = quiet(learn.to_channelslast(use_amp=False).fit, 1)  # back: the channels-last graphs are still cached
    assert 'compiles its graphs once more' not in out
    assert len(rec.graphs) == 4


def test_layout_report_sees_the_plain_module():
    rec = Recording()
    learn = make_learner(cbs=ChannelsLast()).compile(backend=rec)
    learn.fit(1)
    assert learn.model._compiled_call_impl is None
    rep = learn.layout_report(backward=True, copy=False)
    assert rep.model == 'Sequential' and len(rec.graphs) == 2  # ran eagerly, with its hooks
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in learn.model.parameters() if p.dim() == 4)


class FakeClock:
    "A clock for ChannelsLast(auto): each step of `fast` layout takes 1 s, the other 1.3 s (timed every round, not dropped)"
    def __init__(self, cl, fast): self.cl, self.fast, self.t = cl, fast, 0.

    def __call__(self):  # called at before_batch and after_step: half a step each
        self.t += (1. if self.cl.layout == self.fast else 1.3) / 2
        return self.t


@pytest.mark.parametrize('fast', [CHANNELS_LAST, CONTIGUOUS])
def test_auto_measures_eagerly_then_compiles_the_chosen_layout_only(fast):
    rec = Recording()
    cl = ChannelsLast(auto=True, warmup=1, block=1, rounds=2)  # 8 measuring steps
    cl._clock = FakeClock(cl, fast)
    learn = make_learner(cbs=cl).compile(backend=rec)
    learn.validate()                       # before the choice: eager, nothing compiled for a layout that may lose
    assert rec.graphs == []
    out = quiet(learn.fit, 2)              # 12 training steps: 8 eager measuring steps, then 4 compiled
    assert cl.decision.layout == fast
    assert f'ChannelsLast(auto) chose {fast} (fp32) after 8 eager measuring steps' in out
    assert rec.graphs == [fast, fast]      # training and validation, in the chosen layout only
    assert model_layout(learn.model) == fast
    learn.fit(1)
    assert len(rec.graphs) == 2


def test_auto_fit_ending_before_the_choice_waits_again():
    rec = Recording()
    cl = ChannelsLast(auto=True, warmup=1, block=1, rounds=4)  # 16 measuring steps
    cl._clock = FakeClock(cl, CHANNELS_LAST)
    learn = make_learner(cbs=cl).compile(backend=rec)
    quiet(learn.fit, 1)                    # 6 steps: still measuring
    assert rec.graphs == [] and cl.decision is None
    assert 'before_batch' not in learn.torch_compile.__dict__  # no leftover per-batch handler
    quiet(learn.fit, 2)                    # 12 more: chooses at the 16th, compiles after
    assert rec.graphs == [CHANNELS_LAST, CHANNELS_LAST]


# --- results, precision, checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_compiled_matches_eager(amp):
    kw = dict(init_scale=2. ** 30) if amp == 'fp16' else {}  # fp16: the first steps overflow and are skipped
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # fp16/bf16 on a CPU without native support: slow, not wrong
        eager = make_learner(cbs=[ChannelsLast(), MixedPrecision(amp, **kw)], model=tiny_cnn_no_conv_bias).fit(2)
        rec = Recording()
        comp = make_learner(cbs=[ChannelsLast(), MixedPrecision(amp, **kw)], model=tiny_cnn_no_conv_bias)
        comp.compile(backend=rec).fit(2)
    assert len(rec.graphs) == 2
    assert comp.mixed_precision.skipped_steps == eager.mixed_precision.skipped_steps
    if amp == 'fp16': assert comp.mixed_precision.skipped_steps > 0
    assert_close_params(comp, eager)
    pe, pc = eager.get_preds()[0], comp.get_preds()[0]
    assert pc.dtype == torch.float32
    torch.testing.assert_close(pc, pe, atol=1e-5, rtol=1e-4)


class SaveEachEpoch(Callback):
    order = 60  # after Recorder (50): the epoch is done
    def after_epoch(self):
        self.keys = list(self.learn.model.state_dict())
        self.path = self.learn.save(f'epoch{self.learn.epoch}')


def test_checkpoints_have_plain_keys_mid_fit_and_load_into_an_eager_learner(tmp_path):
    rec = Recording()
    saver = SaveEachEpoch()
    learn = make_learner(cbs=[ChannelsLast(), saver], path=tmp_path).compile(backend=rec)
    plain_keys = list(tiny_cnn().state_dict())
    learn.fit(2)
    assert saver.keys == plain_keys
    state = torch.load(saver.path, weights_only=True)
    assert list(state['model']) == plain_keys
    other = make_learner(path=tmp_path).load('epoch1')  # a fresh eager learner
    torch.testing.assert_close(other.get_preds()[0], learn.get_preds()[0])
    assert len(rec.graphs) == 2


def test_deep_copy_and_pickle_of_the_model_carry_no_compiled_call():
    boom = Callback(after_batch=lambda self: (_ for _ in ()).throw(ValueError('boom')))
    rec = Recording()
    learn = make_learner().compile(backend=rec)
    with pytest.raises(ValueError, match='boom'): learn.fit(1, cbs=boom)  # skips after_fit: the call stays installed
    assert learn.model._compiled_call_impl is not None
    assert copy.deepcopy(learn.model)._compiled_call_impl is None
    learn.fit(1)                                          # the next session installs it afresh, removes it after
    assert learn.model._compiled_call_impl is None and len(rec.graphs) == 2
    with pytest.raises(ValueError, match='boom'): learn.fit(1, cbs=boom)
    assert learn.uncompile() is learn and learn.model._compiled_call_impl is None
    learn.fit(1)
    assert len(rec.graphs) == 2


# --- inductor ---------------------------------------------------------------------------------------------------

def test_inductor_matches_eager_and_reuses_its_graphs(tmp_path):
    from torch._dynamo.utils import counters
    # without the conv bias that feeds BatchNorm: its true gradient is 0, and Adam turns the rounding noise of any
    # two computations into steps of ~lr (see `tiny_cnn_no_conv_bias`)
    eager = make_learner(cbs=ChannelsLast(), n=32, model=tiny_cnn_no_conv_bias).fit(1)
    learn = make_learner(cbs=ChannelsLast(), n=32, model=tiny_cnn_no_conv_bias, path=tmp_path).compile()
    before = counters['stats']['unique_graphs']
    learn.fit(1)
    assert counters['stats']['unique_graphs'] - before == 2  # training and validation
    assert_close_params(learn, eager, atol=1e-4)
    torch.testing.assert_close(learn.get_preds()[0], eager.get_preds()[0], atol=1e-4, rtol=1e-3)
    learn.fit(1); learn.validate()
    assert counters['stats']['unique_graphs'] - before == 2  # reused
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in learn.model.parameters() if p.dim() == 4)
    p = learn.save('ckpt')
    assert list(torch.load(p, weights_only=True)['model']) == list(tiny_cnn_no_conv_bias().state_dict())


# --- bad input ----------------------------------------------------------------------------------------------------

def test_unknown_keyword_is_a_type_error_at_the_call():
    learn = make_learner()
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'mdoe'.*Did you mean mode\?"): learn.compile(mdoe='default')
    assert not any(isinstance(c, TorchCompile) for c in learn.cbs)


@pytest.mark.parametrize('kw, msg', [
    (dict(backend='no_such_backend'), r"backend='no_such_backend'.*Invalid backend.*Backends available here: .*inductor"),
    (dict(mode='fastest'), r"mode='fastest'.*Unrecognized mode"),
    (dict(mode='max-autotune', options={'trace.enabled': True}), r"Either mode or options"),
])
def test_rejected_settings_fail_at_the_call_and_change_nothing(kw, msg):
    learn = make_learner().compile(backend=Recording())
    cb = learn.torch_compile
    with pytest.raises(ValueError, match=msg): learn.compile(**kw)
    assert [c for c in learn.cbs if isinstance(c, TorchCompile)] == [cb]


def test_backend_failing_at_compile_time_warns_once_and_trains_eagerly():
    def broken(gm, example_inputs): raise RuntimeError('no C++ compiler here')
    eager = make_learner(cbs=ChannelsLast()).fit(2)
    learn = make_learner(cbs=ChannelsLast()).compile(backend=broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(2); learn.validate()
    msgs = [str(o.message) for o in w if 'TorchCompile' in str(o.message)]
    assert len(msgs) == 1
    assert "backend=<function" in msgs[0] and 'no C++ compiler here' in msgs[0] and 'eager mode' in msgs[0]
    assert isinstance(learn.torch_compile.failed, torch._dynamo.exc.BackendCompilerFailed)
    assert 'failed: eager' in repr(learn.torch_compile)
    assert_close_params(learn, eager, atol=0)  # exactly the eager run: the failed call ran eagerly
    assert learn.recorder.column('valid_loss')[-1] == eager.recorder.column('valid_loss')[-1]
    learn.compile(backend=Recording())         # other settings: compiles again
    assert learn.torch_compile.failed is None


def test_fullgraph_graph_break_falls_back_to_eager():
    class Breaks(nn.Module):
        def __init__(self): super().__init__(); self.net = tiny_cnn()
        def forward(self, x):
            torch._dynamo.graph_break()
            return self.net(x)
    x, y = synth_images(16)
    learn = Learner(DataLoaders.from_tensors((x, y), bs=8), Breaks(), loss_func=F.cross_entropy, progress=False)
    learn.compile(backend=Recording(), fullgraph=True)
    with pytest.warns(RuntimeWarning, match='Unsupported'): learn.fit(1)
    assert learn.torch_compile.failed is not None and len(learn.recorder.losses) == 2


def test_torch_compile_unavailable_raises_and_leaves_the_learner_eager(monkeypatch):
    from torch._dynamo import eval_frame
    def py315(): raise RuntimeError('Python 3.15+ not yet supported for torch.compile')  # torch's own check and text
    monkeypatch.setattr(eval_frame, 'check_if_dynamo_supported', py315)
    assert 'Python 3.15+' in compile_unavailable()
    learn = make_learner()
    with pytest.raises(RuntimeError, match=r'cannot run in this process \(RuntimeError: Python 3.15\+.*eager mode'):
        learn.compile()
    assert not any(isinstance(c, TorchCompile) for c in learn.cbs)
    learn.fit(1)
    assert len(learn.recorder.values) == 1


# --- DDP ------------------------------------------------------------------------------------------------------------

def test_compile_under_ddp(tmp_path):
    "Two gloo ranks under torchrun: DDP wraps the compiled module; results equal the eager DDP run on every rank"
    import json
    from test_distributed import torchrun
    torchrun('tests/compile_ddp_worker.py', str(tmp_path))
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r in ranks:
        assert r['seen'] == [['DistributedDataParallel', True]]   # the loop ran DDP around the compiled module
        assert r['eager_seen'] == [['DistributedDataParallel', False]]
        assert r['graphs'] == 2                                    # training and validation, compiled once each
        assert r['layout'] == CHANNELS_LAST and r['model'] == 'Sequential' and not r['compiled_after']
        assert r['max_diff'] < 1e-5                                # the same steps as eager DDP
    assert ranks[0]['weights'] == ranks[1]['weights']              # DDP kept the ranks identical
    assert ranks[0]['valid_loss'] == ranks[1]['valid_loss']


# --- channelslast-bench --compile -----------------------------------------------------------------------------------

def test_bench_cli_takes_compile_and_the_table_shows_compile_columns():
    from channelslast_cb.bench import COLUMNS, build_parser, format_table
    assert build_parser().parse_args(['resnet18', '--compile']).compile
    assert not build_parser().parse_args(['resnet18']).compile
    assert COLUMNS.index('compiled') + 1 == COLUMNS.index('compile_s')
    row = dict(model='m', source='module', mode='train', layout='channels_last', precision='fp32', samples_per_s=10.,
               step_ms=100., spread_pct=5., speedup=1.2, tflops=.1, pct_peak=10.)
    eager_only = format_table([dict(row, compiled=False, compile_s=None)])
    assert 'compile s' not in eager_only
    both = format_table([dict(row, compiled=False, compile_s=None), dict(row, compiled=True, compile_s=42.25)])
    header, _, eager, comp = both.splitlines()
    assert header.split()[-3:] == ['compiled', 'compile', 's']
    assert eager.split()[-2:] == ['False', '-'] and comp.split()[-2:] == ['True', '42.2']


@pytest.mark.slow  # two inductor compiles of a small CNN: about a minute on a quiet 2-core CPU
def test_bench_compiled_variants_time_compile_apart():
    from channelslast_cb.bench import bench_models
    rows = bench_models([tiny_cnn()], batch_size=4, img_size=16, precisions=['fp32'], steps=1, repeats=2, warmup=0,
                        device='cpu', compiled=True)
    assert [(r['layout'], r['compiled']) for r in rows] == [(CONTIGUOUS, False), (CHANNELS_LAST, False),
                                                           (CONTIGUOUS, True), (CHANNELS_LAST, True)]
    for r in rows:
        assert (r['compile_s'] is not None) == r['compiled']
        if r['compiled']: assert r['compile_s'] > 0 and r['speedup'] > 0
