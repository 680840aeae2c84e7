"""`amp_mode='auto'` (issues 18, 23): the default of `to_channelslast()` and `MixedPrecision()` decides the precision
on the model's own first training steps (the probe only screens out modes far too slow), `auto=True` decides layout x
precision the same way, and the decision is kept: on disk for the next run, in checkpoints and exports.

Each decision is driven for every machine kind seen so far by injected measurements (a seeded probe, a fake step
clock per model kind), so these tests can fail on any machine; the real-machine checks assert that a decision agrees
with what its own trial measured, and that fresh processes keep one decision, never a verdict that rests on a timing.
DDP agreement runs with two real processes.
"""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import channelslast_cb.fp16 as fp16
from channelslast_cb.autotune import AUTO_MARGIN, CHANNELS_LAST, CONTIGUOUS, Setting
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import AMPMode, AMPSpeed, AMPSpeedWarning, MixedPrecision, candidate_settings, decide_amp
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn_no_conv_bias
from test_distributed import torchrun

# The probe's ratios (a 16-bit mode's step time over fp32's) as measured on each kind of CPU seen so far, and which
# precisions it lets through to be timed on the model's own steps
KINDS = {
    'avx2_only':             (dict(bf16=3.1, fp16=5.3), ['fp32']),                 # AMD EPYC Zen 3: both ruled out
    'avx512_bf16':           (dict(bf16=.8, fp16=5.0), ['fp32', 'bf16']),          # AMD EPYC Zen 4
    'amx_bf16_avx512_fp16':  (dict(bf16=.4, fp16=212.), ['fp32', 'bf16']),         # Intel Xeon, no AMX-FP16
    'amx_bf16_amx_fp16':     (dict(bf16=.45, fp16=.35), ['fp32', 'bf16', 'fp16']), # both fast
    'bf16_not_faster':       (dict(bf16=1.3, fp16=4.0), ['fp32', 'bf16']),         # not ruled out: the model decides
}
# A model's real step time per precision, relative to fp32 (channels-last), by model family as measured on the Intel
# Xeon (issue 23): resnet18 and a UNet 1.4-1.6x faster in bf16, efficientnet_b0 and mobilenetv3 1.5-1.6x slower
MODELS = {'resnet_like': dict(bf16=.63, fp16=.5), 'depthwise_like': dict(bf16=1.6, fp16=3.), 'near_tie': dict(bf16=.97, fp16=.99)}


@pytest.fixture
def fresh(monkeypatch):
    "An empty probe cache, nothing warned or said yet in this process, and every choice line captured"
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {})
    monkeypatch.setattr(fp16, '_warned', set())
    monkeypatch.setattr(fp16, '_said', set())
    said = []  # the choice lines reach the learner's `log` (with the Recorder's epoch rows, left out here)
    monkeypatch.setattr(Learner, 'log', lambda self, msg: said.append(msg) if msg.startswith(('MixedPrecision', 'ChannelsLast', 'to_channelslast')) else None)
    return said


def seed(**ratios):
    fp16.AMP_SPEEDS.update({('cpu', AMPMode(m)): AMPSpeed('cpu', AMPMode(m), r) for m, r in ratios.items()})


def make_learner(cbs=None, n=64, bs=8):
    "The tiny CNN on 8 px images; 8 batches an epoch by default"
    dls = DataLoaders.from_tensors(synth_images(n), synth_images(16, seed=1), bs=bs, shuffle=False)
    return Learner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, cbs=cbs, progress=False)


class ConvDtype(Callback):
    "The dtype the first convolution computed in, per training batch"
    def before_fit(self):
        self.seen = []
        self.h = self.learn.model[0].register_forward_hook(lambda m, i, o: self.seen.append(o.dtype) if m.training else None)
    def after_fit(self): self.h.remove()


DTYPE = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def default_fit(real, cf=1.05, n_batches=40, learn=None):
    "The default call, `to_channelslast()`, trained with a fake step clock: fp32 channels-last 10 ms, others by `real`"
    learn = learn or make_learner(n=8 * n_batches)
    learn.to_channelslast()
    cb, mp = learn.channels_last, learn.mixed_precision
    cost = lambda: .010 * (cf if cb.layout == CONTIGUOUS else 1.) * (1. if mp.precision in (None, 'fp32') else real[mp.precision])
    t = [0.]
    def clock():
        t[0] += cost() / 2
        return t[0]
    cb._clock = clock
    learn.add_cb(probe := ConvDtype())
    learn.fit(1)
    return learn, probe.seen


def want_for(kind, model):
    "What the default must train in: the fastest timed precision, a 16-bit one only when clearly faster than fp32"
    timed, real = KINDS[kind][1], MODELS[model]
    best = min(timed, key=lambda p: 1. if p == 'fp32' else real[p])
    return best if best == 'fp32' or real[best] < 1 / (1 + AUTO_MARGIN) else 'fp32'


# ---------------------------------------------------------------- the default decision, every machine kind x model

@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('kind', KINDS)
def test_default_call_decides_on_the_models_own_steps(fresh, kind, model):
    seed(**KINDS[kind][0])
    want = want_for(kind, model)
    with warnings.catch_warnings():
        warnings.simplefilter('error', AMPSpeedWarning)  # 'auto' never times a mode the probe ruled out, so never warns
        learn, seen = default_fit(MODELS[model])
    cb, mp = learn.channels_last, learn.mixed_precision
    d = cb.decision
    assert (mp.amp_mode, mp.precision, d.precision, d.layout) == (AMPMode.AUTO, want, want, CHANNELS_LAST), d
    assert {str(r['setting']) for r in d.table} == {f'{l}/{p}' for p in KINDS[kind][1] for l in (CHANNELS_LAST, CONTIGUOUS)}
    n = len(KINDS[kind][1])                                     # clear after two rounds: the screening round of every
    assert d.steps <= (3 + 2) * n + 3 * n, d                    # setting (contiguous, only noted, warms up once),
                                                                # then one of the channels-last ones
    assert set(seen[d.steps:]) == {DTYPE[want]}                 # every later step trains in it
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)  # the model stays channels-last
    assert mp.skips_nonfinite_steps == (want == 'fp16')         # a GradScaler at work exactly when fp16 trains
    line = [m for m in fresh if m.startswith('to_channelslast')]
    assert len(line) == 1 and f"trains Sequential in {want} on cpu: kept channels_last/{want}" in line[0], fresh
    assert 'measuring steps' in line[0] and '\n' not in line[0]
    if want == 'fp32':  # the loop then runs as if the callback were not there
        assert not any(c is mp for e in ('after_pred', 'before_backward', 'before_step', 'after_step')
                       for c, _ in learn._tables[True][e])


def test_the_probe_only_screens(fresh):
    "The probe says bf16 is fast (0.8x), the model's own steps say 1.6x slower: the model wins, after one timed step"
    seed(**KINDS['avx512_bf16'][0])
    learn, seen = default_fit(dict(bf16=2.5))
    d = learn.channels_last.decision
    assert d.precision == 'fp32' and {str(r['setting']): r['timed'] for r in d.table}['channels_last/bf16'] == 1, d
    assert d.steps == 2 * 3 + 2 * 2, d                        # round 1 only: every other setting dropped after it
    assert seen[:d.steps].count(torch.bfloat16) == 3 + 2      # channels-last: two warm-up steps and one timed step;
                                                              # contiguous (only noted): one and one


def test_avx2_only_decides_fp32_at_once(fresh):
    seed(**KINDS['avx2_only'][0])
    learn = make_learner().to_channelslast()
    assert learn.mixed_precision.precision == 'fp32'          # known right after the call: nothing to time
    assert any("no 16-bit mode is worth a training step" in m for m in fresh), fresh


def test_contiguous_clearly_faster_is_said_and_not_taken(fresh):
    seed(**KINDS['avx512_bf16'][0])
    learn, _ = default_fit(MODELS['resnet_like'], cf=.8)
    d = learn.channels_last.decision
    assert d.layout == CHANNELS_LAST and learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    line = [m for m in fresh if m.startswith('to_channelslast')][0]
    assert 'contiguous/bf16 trains 1.25x as fast as it' in line and 'to_channelslast(auto=True) would keep it' in line, line


def test_a_cache_hit_costs_no_measuring_step_and_says_so(fresh):
    seed(**KINDS['avx512_bf16'][0])
    learn, _ = default_fit(MODELS['resnet_like'])
    assert learn.channels_last.decision.source == 'measured'
    fresh.clear()
    learn2, seen = default_fit(dict(bf16=5.), learn=make_learner(n=8 * 40))  # another clock: it must not be read
    d = learn2.channels_last.decision
    assert (d.source, d.precision, set(seen)) == ('cached', 'bf16', {torch.bfloat16})  # bf16 from the first step
    line = [m for m in fresh if m.startswith('to_channelslast')][0]
    assert 'decided on ' in line and 'cached: no measuring step' in line, line


def test_cache_off_measures_every_run(fresh, monkeypatch):
    monkeypatch.setenv('CHANNELSLAST_CB_CACHE', 'off')
    seed(**KINDS['avx512_bf16'][0])
    for _ in range(2):
        learn, _ = default_fit(MODELS['resnet_like'])
        assert learn.channels_last.decision.source == 'measured'


def test_explicit_modes_are_honoured_and_warned(fresh):
    seed(bf16=3.1, fp16=5.3)
    for call, mode in ((lambda l: l.to_channelslast(amp_mode='bf16'), 'bf16'), (lambda l: l.to_fp16(), 'fp16'),
                       (lambda l: l.to_channelslast(amp_mode='fp16'), 'fp16')):
        fp16._warned.clear()
        learn = make_learner()
        with pytest.warns(AMPSpeedWarning, match=f'{mode} mixed precision trains much slower than fp32'): call(learn)
        assert learn.mixed_precision.precision == mode


def test_said_once_per_process_and_silenced_by_one_switch(fresh, monkeypatch):
    seed(bf16=3.1, fp16=5.3)
    for _ in range(3): make_learner().to_channelslast()
    make_learner(cbs=MixedPrecision()).fit(1)
    assert len([m for m in fresh if m.startswith('MixedPrecision')]) == 1
    fp16._said.clear()
    fresh.clear()
    monkeypatch.setattr(fp16, 'SAY_CHOICES', False)
    make_learner().to_channelslast().fit(1)
    assert fresh == []


def test_cuda_is_fp16_with_a_scaler_as_fastai(fresh):
    "No probe and no trial on CUDA: fp16 runs on every GPU's fast path (decided here without a GPU: nothing runs on it)"
    c = decide_amp('cuda:0')
    assert (c.precision, c.mode, c.speeds) == ('fp16', AMPMode.FP16, ()) and 'GradScaler' in c.reason
    assert fp16.AMP_SPEEDS == {}  # and nothing was probed


@pytest.mark.cuda
def test_cuda_default_call_trains_fp16_with_a_scaler():
    learn = make_learner()
    learn.model.cuda()
    learn.dls.device = torch.device('cuda')
    learn.to_channelslast().fit(1)
    mp = learn.mixed_precision
    assert mp.precision == 'fp16' and mp.scaler is not None and mp.scaler.is_enabled()
    assert learn.channels_last.decision is None  # no measuring on CUDA


def test_real_decision_agrees_with_what_it_measured(fresh):
    "On this machine, real steps: the default keeps what its own table says by the rule, whatever the machine says"
    learn = make_learner(n=8 * 60).to_channelslast()  # longer than any trial (a near tie runs every round)
    learn.fit(1)
    d = learn.channels_last.decision
    vs = {r['setting']: r['vs_kept'] for r in d.table if r['setting'].layout == CHANNELS_LAST and r['timed']}
    assert d.layout == CHANNELS_LAST and d.source == 'measured'
    order = [s for s in (Setting(CHANNELS_LAST, p) for p in ('fp32', 'bf16', 'fp16')) if s in vs]
    # nothing earlier in the order of preference is within the margin of the kept one; nothing clearly faster than it
    assert all(vs[s] > 1 + AUTO_MARGIN - 1e-9 for s in order[:order.index(d.setting)]), d
    assert all(v * (1 + AUTO_MARGIN) >= 1 - 1e-9 for v in vs.values()), d
    assert learn.mixed_precision.precision == d.precision


# ---------------------------------------------------------------- auto=True: layout x precision on real steps

def step_clock(cb, learn, cost):
    "A clock that advances by half the cost of the setting the learner is in at each reading (two per step)"
    t = [0.]
    def clock():
        t[0] += cost[cb.layout, learn.mixed_precision.precision] / 2
        return t[0]
    return clock


def auto_fit(cost, n_batches=40, **window):
    cb = ChannelsLast(auto=True, **{'warmup': 1, 'block': 2, 'rounds': 3, **window})
    learn = make_learner([cb, MixedPrecision(), probe := ConvDtype()], n=8 * n_batches)
    cb._clock = step_clock(cb, learn, cost)
    learn.fit(1)
    return learn, cb.decision, probe.seen


def cost_of(fp32_cl, fp32_cf, **per_precision):
    "Step costs (seconds) per (layout, precision): fp32's given, each 16-bit mode a multiple of fp32's"
    cost = {(CHANNELS_LAST, 'fp32'): fp32_cl, (CONTIGUOUS, 'fp32'): fp32_cf}
    for p, f in per_precision.items(): cost.update({(CHANNELS_LAST, p): f * fp32_cl, (CONTIGUOUS, p): f * fp32_cf})
    return cost


@pytest.mark.parametrize('kind, real, want, dropped', [
    # AVX2 only: the probe rules both 16-bit modes out; only the layouts are timed, channels-last a little faster
    ('avx2_only', dict(), (CHANNELS_LAST, 'fp32'), set()),
    # Zen 4: bf16 timed and ~1.9x faster; the fp32 settings are dropped after their first block
    ('avx512_bf16', dict(bf16=.52), (CHANNELS_LAST, 'bf16'), {'channels_last/fp32', 'contiguous/fp32'}),
    # Intel, fp16 pathological: never timed
    ('amx_bf16_avx512_fp16', dict(bf16=.45), (CHANNELS_LAST, 'bf16'), {'channels_last/fp32', 'contiguous/fp32'}),
    # the probe says bf16 is fast, the model's real steps say 12x slower: real steps win, after one block of bf16
    ('avx512_bf16', dict(bf16=12.), (CHANNELS_LAST, 'fp32'), {'channels_last/bf16', 'contiguous/bf16'}),
    # the probe says bf16 is not faster (1.3x: 'auto' alone trains fp32), real steps say it is: real steps win
    ('bf16_not_faster', dict(bf16=.6), (CHANNELS_LAST, 'bf16'), {'channels_last/fp32', 'contiguous/fp32'}),
])
def test_auto_decides_layout_and_precision_on_real_steps(fresh, kind, real, want, dropped):
    seed(**KINDS[kind][0])
    learn, d, seen = auto_fit(cost_of(.010, .011, **real))
    assert (d.layout, d.precision) == want
    assert {str(r['setting']) for r in d.table if r['dropped_after']} == dropped
    assert {str(r['setting']) for r in d.table} == {str(s) for s in candidate_settings('cpu')[0]}
    assert set(d.left_out) == {m for m, r in KINDS[kind][0].items() if r > fp16.AMP_SLOW_RATIO}  # ruled out by the probe
    # every later step (this fit and the next) trains in the setting kept
    assert set(seen[d.steps:]) == {DTYPE[want[1]]} and learn.mixed_precision.precision == want[1]
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last) == (want[0] == CHANNELS_LAST)
    learn.fit(1)
    assert learn.mixed_precision.precision == want[1] and learn.channels_last.decision is d
    # the one line: what was kept, against what
    line = [m for m in fresh if m.startswith('ChannelsLast(auto): kept')]
    assert len(line) == 1 and f"kept {want[0]}/{want[1]}" in line[0] and '\n' not in line[0]


def test_a_slow_mode_costs_a_couple_of_steps_not_an_epoch(fresh):
    "bf16 12x slower on real steps than the probe said: its settings run one timed step each (after a warm-up), no more"
    seed(**KINDS['avx512_bf16'][0])
    learn, d, seen = auto_fit(cost_of(.010, .011, bf16=12.), warmup=1, block=2, rounds=4)
    assert seen[:d.steps].count(torch.bfloat16) == 2 * 2  # two layouts x (1 warm-up + 1 timed)
    assert d.steps == 4 * 2 + 2 * 3                      # round 1: 4 settings; round 2: the 2 fp32 ones, then clear


def test_a_fixed_precision_or_none_leaves_only_the_layout_open(fresh):
    seed(**KINDS['avx512_bf16'][0])
    cost = cost_of(.010, .011, bf16=.5)
    for mp, prec in ((MixedPrecision('bf16'), 'bf16'), (None, 'fp32')):
        cb = ChannelsLast(auto=True, warmup=1, block=2, rounds=2)
        learn = make_learner([cb] + ([mp] if mp else []), n=8 * 20)
        t = [0.]
        def clock(): t[0] += cost[cb.layout, prec] / 2; return t[0]
        cb._clock = clock
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', AMPSpeedWarning)  # (not seeded slow here; the real probe may say so)
            learn.fit(1)
        assert [str(r['setting']) for r in cb.decision.table] == [f'channels_last/{prec}', f'contiguous/{prec}']


def test_fastai_learner_decides_the_same_way(fresh):
    "fastai's Learner with `import channelslast_cb.fastai`: the default call and auto=True call the same decision"
    import channelslast_cb.fastai  # noqa: F401
    from fastai.data.core import DataLoaders as FaiDataLoaders
    from fastai.learner import Learner as FaiLearner
    from torch.utils.data import TensorDataset
    for kind in ('avx2_only', 'avx512_bf16'):
        fp16.AMP_SPEEDS.clear()
        fp16._said.clear()
        ratios, want = KINDS[kind][0], {'avx2_only': 'fp32', 'avx512_bf16': 'bf16'}[kind]
        seed(**ratios)
        dls = FaiDataLoaders.from_dsets(TensorDataset(*synth_images(8 * 40)), TensorDataset(*synth_images(16, seed=1)),
                                        bs=8, device='cpu')
        learn = FaiLearner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, cbs=(probe := ConvDtype()))
        learn.to_channelslast()
        cb = learn.channels_last
        cb._clock = step_clock(cb, learn, cost_of(.010, .011, bf16=.52))
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
        d = learn.channels_last.decision
        assert learn.mixed_precision.precision == want and set(probe.seen[d.steps:]) == {DTYPE[want]}
        learn.to_channelslast(auto=True)
        cb = learn.channels_last
        cb._clock = step_clock(cb, learn, cost_of(.010, .011, bf16=.52))
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
        assert cb.decision.precision == want  # Zen 4: bf16 timed and kept; AVX2: only fp32 timed


# ---------------------------------------------------------------- bad input

def test_bad_input(fresh):
    learn = make_learner()
    assert learn.to_channelslast(amp_mode='AUTO').mixed_precision.amp_mode is AMPMode.AUTO
    assert MixedPrecision(amp_mode='Auto').amp_mode is AMPMode.AUTO
    with pytest.raises(ValueError, match=r"amp_mode 'fp8' is not one of 'fp16', 'bf16', 'auto'"):
        learn.to_channelslast(amp_mode='fp8')
    with pytest.raises(ValueError, match=r"to_channelslast\(use_amp=False\) adds no MixedPrecision, so init_scale cannot"):
        learn.to_channelslast(use_amp=False, init_scale=1024.)
    with pytest.raises(ValueError, match="only amp_mode='auto' can be switched to fp32"):
        MixedPrecision('bf16').use('fp32')
    with pytest.raises(ValueError, match="needs a 16-bit mode, 'fp16' or 'bf16', not 'auto'"): fp16.amp_speed('auto', 'cpu')
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"): Setting(CHANNELS_LAST, 'auto')
    assert learn.mixed_precision.amp_mode is AMPMode.AUTO  # the bad calls changed nothing


# ---------------------------------------------------------------- DDP: every rank takes the same decision

@pytest.fixture(scope='module')
def ddp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp_auto')
    torchrun('tests/ddp_auto_worker.py', str(out))
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


def test_ddp_ranks_take_rank0s_default_decision(ddp_ranks):
    r0, r1 = ddp_ranks
    assert (r0['alone'], r1['alone']) == (None, 'fp32')    # alone, rank 0 would time bf16, rank 1 would not
    assert r0['default'] == r1['default'] == 'bf16'        # one precision for all, timed on both ranks' steps


def test_ddp_ranks_take_one_auto_decision(ddp_ranks):
    r0, r1 = ddp_ranks
    assert r1['candidates_alone'] == ['channels_last/fp32', 'contiguous/fp32']  # rank 1's probe ruled bf16 out
    assert r0['auto'] == r1['auto'] and r0['auto']['kept'] == 'channels_last/bf16', (r0['auto'], r1['auto'])
    assert r0['auto']['timed'] == ['channels_last/fp32', 'contiguous/fp32', 'channels_last/bf16', 'contiguous/bf16']
    assert r0['precision'] == r1['precision'] == 'bf16' and r0['weights'] == r1['weights']


# ---------------------------------------------------------------- the benchmark names the setting auto=True keeps

@pytest.mark.parametrize('kind', ['avx2_only', 'avx512_bf16'])
def test_bench_marks_what_auto_keeps_by_the_same_rule(fresh, kind):
    "Given the same interleaved rounds, `channelslast-bench` and `StepTrial` keep the same setting"
    from channelslast_cb.autotune import StepTrial
    from channelslast_cb.bench import mark_auto_choice
    seed(**KINDS[kind][0])
    rounds = [{(CHANNELS_LAST, 'fp32'): 10., (CONTIGUOUS, 'fp32'): 9.5, (CHANNELS_LAST, 'bf16'): 6., (CONTIGUOUS, 'bf16'): 6.3},
              {(CHANNELS_LAST, 'fp32'): 10.2, (CONTIGUOUS, 'fp32'): 9.9, (CHANNELS_LAST, 'bf16'): 6.6, (CONTIGUOUS, 'bf16'): 6.2},
              {(CHANNELS_LAST, 'fp32'): 9.8, (CONTIGUOUS, 'fp32'): 9.7, (CHANNELS_LAST, 'bf16'): 5.9, (CONTIGUOUS, 'bf16'): 6.0}]
    rows = [dict(model='m', mode='train', layout=l, precision=p, round_ms=[r[l, p] for r in rounds]) for l, p in rounds[0]]
    kept = next(r for r in mark_auto_choice(rows, 'cpu') if r['auto'])
    trial = StepTrial(candidate_settings('cpu')[0], warmup=0, block=1, rounds=3)
    while trial.setting is not None: trial.record(rounds[len(trial.round_times)][trial.setting.layout, trial.setting.precision])
    assert (kept['layout'], kept['precision']) == (trial.decision.layout, trial.decision.precision)
    assert trial.decision.precision == {'avx2_only': 'fp32', 'avx512_bf16': 'bf16'}[kind]
    assert sum(r['auto'] for r in rows) == 1


def test_a_precision_changed_mid_trial_starts_the_trial_over(fresh):
    "auto=True was measuring fp32 and bf16 when the user fixed bf16: the next fit times bf16 only, and never fp32"
    seed(**KINDS['avx512_bf16'][0])
    cb = ChannelsLast(auto=True, warmup=1, block=2, rounds=2, drop=100.)
    learn = make_learner([cb, MixedPrecision()], n=8 * 6)  # 6 of the 24 measuring steps
    learn.fit(1)
    assert cb.decision is None and {s.precision for s in cb.trial.settings} == {'bf16', 'fp32'}
    learn.to_bf16()
    learn.add_cb(probe := ConvDtype())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', AMPSpeedWarning)
        learn.fit(2)
    assert cb.decision is not None and cb.decision.precision == 'bf16' and set(probe.seen) == {torch.bfloat16}
    assert [str(r['setting']) for r in cb.decision.table] == ['channels_last/bf16', 'contiguous/bf16']
