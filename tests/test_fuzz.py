"""Property-based bad input (hypothesis) over the public entry points.

For each entry point, hypothesis draws one argument and a wrong value for it (wrong type: strings, bools, lists,
dicts, objects; wrong value: negative, zero, nan, inf, out of range), passes it with every other argument valid,
and checks that the call raises one of the library's documented exceptions (`TypeError`, `ValueError`,
`RuntimeError`; argparse's `SystemExit(2)` for the command line) whose message names the argument, before any
training starts, and that the learner still trains afterwards.

Reproducible and bounded: `derandomize=True` (the same examples on every run); pytest parametrizes the argument
and hypothesis draws up to `MAX_EXAMPLES` (5) wrong values for it, so every argument of every entry point is hit:
63 arguments of 9 entry points (`Learner`, `fit`, `fit_one_cycle`, `DataLoaders`, `MixedPrecision`,
`ChannelsLast`, `to_channelslast`/`to_contiguous`, `layout_report`, `channelslast-bench` through `main`), at most
315 bad inputs per run (fewer where an argument has fewer wrong values to draw); each case asserts it tried at
least one. About 10 s here (2 shared CPU cores), most of it the first `torch.optim` and timm imports.
"""
import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channelslast_cb.audit import layout_report
from channelslast_cb.bench import build_parser, main as bench_main
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner, accuracy
from helpers import synth_images, tiny_cnn

MAX_EXAMPLES = 5
FUZZ = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
ERRORS = (TypeError, ValueError, RuntimeError)

# Values that are wrong for every argument below that takes a number, a bool, a model, data or a function
JUNK = st.sampled_from(['1', '', 'accuracy', b'x', [], [1, 2], {}, {'a': 1}, object(), (1, 'a'), 1j, torch.ones(2)])
NEG = st.floats(max_value=-1e-12, allow_nan=False) | st.integers(max_value=-1)
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_BOOL = JUNK | st.integers() | st.floats() | st.none()
NOT_BOOL_NOR_NONE = JUNK | st.integers() | st.floats()


def data():
    return DataLoaders.from_tensors(synth_images(8), valid=synth_images(4, seed=1), bs=4, shuffle=False)


def learner(**kw):
    kw.setdefault('loss_func', F.cross_entropy)
    return Learner(data(), tiny_cnn(), progress=False, **kw)


def raises_naming(f, name, *names):
    "Check that `f()` raises an allowed error whose message names the argument `name` (or one of `names`)"
    with pytest.raises(ERRORS) as e: f()
    msg = str(e.value)
    assert any(n in msg for n in (name, *names)), f"{name}: {type(e.value).__name__}: {msg}"


def fuzz(bad: dict, body):
    "Run `body(k, v)` on up to MAX_EXAMPLES wrong values `v` of argument `k` drawn from `bad[k]`; return how many ran"
    def run(k):
        n = [0]
        @FUZZ
        @given(st.data())
        def go(data):
            n[0] += 1
            body(k, data.draw(bad[k], label=k))
        go()
        assert n[0] >= 1
        return n[0]
    return run


def trains(learn):
    "The learner still trains: a one-epoch fit changes the weights and records a finite loss"
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    learn.recorder.print_table = False
    learn.fit(1, lr=1e-2)
    assert math.isfinite(learn.recorder.losses[-1])
    assert any(not torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))


LEARNER_BAD = {
    'dls': JUNK | st.none(),
    'model': JUNK | st.none(),
    'loss_func': JUNK.filter(lambda v: not callable(v)) | st.none(),
    'opt_func': JUNK.filter(lambda v: not callable(v)) | st.none(),
    'lr': JUNK | NEG | NONFINITE | st.just(0) | st.booleans() | st.none(),
    'wd': JUNK | NEG | NONFINITE | st.booleans(),
    'cbs': st.sampled_from(['ChannelsLast', 5, 1.5, [Callback(), 'x'], [5], object(), {'a': 1}]),
    'metrics': st.sampled_from(['accuracy', 5, [accuracy, 'x'], [5], 1.5, object()]),
    'device': st.sampled_from(['nope', 'cuda:x', 5.5, [], object(), 'meta']),
    'progress': st.sampled_from(['yes', 1.5, [], object(), 2]),
    'path': st.sampled_from([5, 1.5, [], object(), None]),
}


FIT_BAD = {
    'n_epoch': JUNK | st.integers(max_value=0) | st.floats() | st.booleans(),
    'lr': JUNK | NEG | NONFINITE | st.just(0) | st.booleans(),
    'wd': JUNK | NEG | NONFINITE | st.booleans(),
    'cbs': st.sampled_from(['ChannelsLast', 5, [Callback(), 'x'], [Callback(), 5], object()]),
    'reset_opt': JUNK | st.integers() | st.none(),
}

ONE_CYCLE_BAD = {
    'lr_max': JUNK | NEG | NONFINITE | st.just(0) | st.booleans(),
    'div': JUNK | NEG | NONFINITE | st.just(0) | st.booleans() | st.none(),
    'div_final': JUNK | NEG | NONFINITE | st.just(0) | st.booleans() | st.none(),
    'pct_start': JUNK | NONFINITE | st.floats(max_value=0) | st.floats(min_value=1) | st.booleans() | st.none(),
    'moms': (JUNK.filter(lambda v: not isinstance(v, (list, tuple)) or len(v) != 3) | st.floats()
             | st.tuples(*[st.floats(min_value=1) | st.floats(max_value=-1e-9) | NONFINITE] * 3)
             | st.lists(st.floats(0, 0.9), max_size=5).filter(lambda l: len(l) != 3)),
    'wd': JUNK | NEG | NONFINITE,
}

DLS_BAD = {
    'train': st.sampled_from([None, 5, 1.5, 'abc', b'x', object(), [], (), iter([(1, 2)]), (b for b in [1]), {}]),
    'valid': st.sampled_from([5, 1.5, 'abc', object(), [], iter([(1, 2)]), (b for b in [1]), {}]),
    'device': st.sampled_from(['nope', 'cuda:x', 5.5, [], object()]),
    'n_inp': JUNK | st.integers(max_value=0) | st.floats() | st.booleans(),
}

MP_BAD = {
    'amp_mode': st.sampled_from(['fp8', 'fp32', '', 5, None, object(), True]),
    'init_scale': JUNK | NEG | NONFINITE | st.just(0) | st.booleans(),
    'growth_factor': JUNK | st.floats(max_value=1) | st.sampled_from([math.nan, -math.inf]) | st.booleans(),
    'backoff_factor': JUNK | st.floats(min_value=1) | st.floats(max_value=0) | NONFINITE | st.booleans(),
    'growth_interval': JUNK | st.integers(max_value=0) | st.floats() | st.booleans(),
    'enabled': NOT_BOOL.filter(lambda v: not isinstance(v, bool)),
    'max_grad_norm': JUNK | NEG | NONFINITE | st.just(0) | st.booleans(),
}

CL_BAD = {
    'auto': NOT_BOOL,
    'warmup': JUNK | st.integers(max_value=-1) | st.floats() | st.booleans() | st.none(),
    'block': JUNK | st.integers(max_value=0) | st.floats() | st.booleans() | st.none(),
    'rounds': JUNK | st.integers(max_value=0) | st.floats() | st.booleans() | st.none(),
    'before_fitt': st.just(lambda self: None),  # a misspelt event
    'before_fit': JUNK.filter(lambda v: not callable(v)),  # a handler that is not a function
}

TO_CL_BAD = {
    'use_amp': NOT_BOOL_NOR_NONE.filter(lambda v: not isinstance(v, bool)),
    'amp_mode': st.sampled_from(['fp8', 'fp32', '', 5, None, object()]),
    'auto': NOT_BOOL_NOR_NONE.filter(lambda v: not isinstance(v, bool)),
    'init_scale': JUNK | NEG | NONFINITE | st.just(0),
    'max_grad_norm': JUNK | NEG | NONFINITE | st.booleans(),
    'init_scal': st.just(2. ** 10),  # a misspelt keyword
    'to_fp32': NOT_BOOL.filter(lambda v: not isinstance(v, bool)),  # to_contiguous's
}

REPORT_BAD = {
    'model': JUNK | st.none(),
    'x': st.sampled_from(['abc', 5, None, [1, 2], {}, object()]),
    'backward': NOT_BOOL,
    'loss_func': JUNK.filter(lambda v: not callable(v)),
    'train': NOT_BOOL.filter(lambda v: v is not None),
    'amp': st.sampled_from(['fp8', 'fp32', '', 5, object(), True]),
    'copy': NOT_BOOL_NOR_NONE,
}


# --- Learner(...) ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('k', sorted(LEARNER_BAD))
def test_learner_rejects_bad_arguments(k):
    also = {'cbs': ('Callback',), 'metrics': ('metric',), 'device': ("'meta'",)}.get(k, ())
    def body(k, v):
        kw = dict(dls=data(), model=tiny_cnn(), loss_func=F.cross_entropy, progress=False)
        kw[k] = v
        raises_naming(lambda: Learner(**kw), k, *also)
    fuzz(LEARNER_BAD, body)(k)


# --- fit / fit_one_cycle: nothing runs, and the learner still trains after -------------------------------------

@pytest.mark.parametrize('method, k', [('fit', k) for k in sorted(FIT_BAD)] + [('fit_one_cycle', k) for k in sorted(ONE_CYCLE_BAD)])
def test_fit_rejects_bad_arguments_before_training(method, k):
    learn = learner(metrics=accuracy)
    cbs0, w0 = list(learn.cbs), [p.detach().clone() for p in learn.model.parameters()]
    def body(k, v):
        n_epoch, kw = (v, {}) if k == 'n_epoch' else (1, {k: v})
        raises_naming(lambda: getattr(learn, method)(n_epoch, **kw), k, *(('Callback',) if k == 'cbs' else ()))
        assert learn.cbs == cbs0  # nothing added or left behind
        assert learn.train_iter == 0 and learn.opt is None  # no batch ran, not even the optimizer was built
        assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    fuzz(FIT_BAD if method == 'fit' else ONE_CYCLE_BAD, body)(k)
    trains(learn)


# --- DataLoaders -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('k', sorted(DLS_BAD))
def test_dataloaders_rejects_bad_arguments(k):
    x, y = synth_images(8)
    def body(k, v):
        kw = dict(train=[(x, y)], valid=[(x, y)])
        kw[k] = v
        raises_naming(lambda: DataLoaders(**kw), k)
    fuzz(DLS_BAD, body)(k)


# --- MixedPrecision / ChannelsLast / to_channelslast / to_contiguous -------------------------------------------

@pytest.mark.parametrize('k', sorted(MP_BAD))
def test_mixed_precision_rejects_bad_arguments(k):
    fuzz(MP_BAD, lambda k, v: raises_naming(lambda: MixedPrecision(**{k: v}), k))(k)


@pytest.mark.parametrize('k', sorted(CL_BAD))
def test_channels_last_rejects_bad_arguments(k):
    fuzz(CL_BAD, lambda k, v: raises_naming(lambda: ChannelsLast(**{k: v}), k))(k)


@pytest.mark.parametrize('k', sorted(TO_CL_BAD))
def test_to_channelslast_and_to_contiguous_reject_bad_arguments(k):
    learn = learner()
    learn.to_channelslast(amp_mode='bf16')
    state = lambda: [type(c).__name__ + repr(getattr(c, 'amp_mode', '')) for c in learn.cbs]
    s0 = state()
    def body(k, v):
        if k == 'to_fp32': raises_naming(lambda: learn.to_contiguous(to_fp32=v), k)
        else: raises_naming(lambda: learn.to_channelslast(**{k: v}), k)
        assert state() == s0  # a bad call leaves the callbacks as they were
    fuzz(TO_CL_BAD, body)(k)
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    trains(learn)


# --- layout_report ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('k', sorted(REPORT_BAD))
def test_layout_report_rejects_bad_arguments(k):
    def body(k, v):
        kw = dict(model=tiny_cnn(), x=synth_images(2)[0])
        kw[k] = v
        raises_naming(lambda: layout_report(**kw), k)
    fuzz(REPORT_BAD, body)(k)


# --- channelslast-bench: argparse exits with status 2 and names the option, before any timing ------------------

INT_OPTS = {'--batch-size': 1, '--img-size': 1, '--steps': 1, '--repeats': 1, '--warmup': 0, '--threads': 1}
BAD_INT = st.sampled_from(['x', '', '1.5', 'nan', '-', '1e3'])
BENCH_BAD = {**{o: BAD_INT | st.integers(max_value=lo - 1).map(str) for o, lo in INT_OPTS.items()},
             '--precision': st.sampled_from(['fp8', 'FP32x', '', 'int8']),
             '--device': st.sampled_from(['nope', 'cuda:x', 'tpu9']),
             '--plot': st.sampled_from(['x.jpeg2', 'plot', 'a.txt']),
             '--csv': st.sampled_from(['/proc/nope.csv', '/sys/x.csv'])}


@pytest.mark.parametrize('opt', sorted(BENCH_BAD))
def test_bench_cli_rejects_bad_arguments(opt):
    def body(opt, val):
        argv = ['test_resnet', '--device', 'cpu', opt, val] if opt != '--device' else ['test_resnet', opt, val]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
            bench_main(argv)
        assert e.value.code == 2, (argv, err.getvalue())
        msg = err.getvalue().splitlines()[-1]
        assert opt.lstrip('-') in msg and 'round' not in err.getvalue(), (argv, msg)  # named, and nothing was timed
    fuzz(BENCH_BAD, body)(opt)
    assert build_parser().parse_args(['test_resnet']).steps == 10  # the parser still parses good input
