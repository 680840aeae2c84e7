"""`amp_mode='auto'` (issue 18): the default of `to_channelslast()` and `MixedPrecision()` decides the precision from
measurement on the running machine, and `auto=True` decides layout x precision on real training steps.

Each decision is driven for every machine kind seen so far by injected measurements (a seeded probe cache, a fake
step clock), so these tests can fail on any machine; one test checks the real decision on the machine it runs on
against real training steps, where the truth is clear-cut. DDP agreement runs with two real processes.
"""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import channelslast_cb.fp16 as fp16
from channelslast_cb.autotune import CHANNELS_LAST, CONTIGUOUS, Setting, candidate_settings
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import AMPMode, AMPSpeed, AMPSpeedWarning, MixedPrecision, decide_amp
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn_no_conv_bias
from test_amp_probe import train_step_ratios
from test_distributed import torchrun

# The probe's ratios (a 16-bit mode's step time over fp32's) as measured on each kind of CPU seen so far, and what
# 'auto' must train in there
KINDS = {
    'avx2_only':             (dict(bf16=3.1, fp16=5.3), 'fp32'),   # AMD EPYC Zen 3: both 16-bit modes much slower
    'avx512_bf16':           (dict(bf16=.8, fp16=5.0), 'bf16'),    # AMD EPYC Zen 4
    'amx_bf16_avx512_fp16':  (dict(bf16=.4, fp16=212.), 'bf16'),   # Intel Xeon, no AMX-FP16: fp16 pathological
    'amx_bf16_amx_fp16':     (dict(bf16=.45, fp16=.35), 'fp16'),   # both fast: the faster one
    'bf16_not_faster':       (dict(bf16=1.3, fp16=4.0), 'fp32'),   # not faster is not used, even if not "slow"
}


@pytest.fixture
def fresh(monkeypatch):
    "An empty probe cache, nothing warned or said yet in this process, and every choice line captured"
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {})
    monkeypatch.setattr(fp16, '_warned', set())
    monkeypatch.setattr(fp16, '_said', set())
    said = []  # the choice lines reach the learner's `log` (with the Recorder's epoch rows, left out here)
    monkeypatch.setattr(Learner, 'log', lambda self, msg: said.append(msg) if msg.startswith(('MixedPrecision', 'ChannelsLast')) else None)
    return said


def seed(**ratios):
    fp16.AMP_SPEEDS.update({('cpu', AMPMode(m)): AMPSpeed('cpu', AMPMode(m), r) for m, r in ratios.items()})


def make_learner(cbs=None, n=64, bs=8):
    dls = DataLoaders.from_tensors(synth_images(n), synth_images(16, seed=1), bs=bs, shuffle=False)
    return Learner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, cbs=cbs, progress=False)


class ConvDtype(Callback):
    "The dtype the first convolution computed in, per training batch"
    def before_fit(self):
        self.seen = []
        self.h = self.learn.model[0].register_forward_hook(lambda m, i, o: self.seen.append(o.dtype) if m.training else None)
    def after_fit(self): self.h.remove()


DTYPE = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# ---------------------------------------------------------------- the default decision, every machine kind

@pytest.mark.parametrize('kind', KINDS)
def test_default_call_trains_in_what_is_fast_on_each_cpu_kind(fresh, kind):
    ratios, want = KINDS[kind]
    seed(**ratios)
    with warnings.catch_warnings():
        warnings.simplefilter('error', AMPSpeedWarning)  # 'auto' never picks a slow mode, so never warns
        learn = make_learner().to_channelslast()
        mp = learn.mixed_precision
        assert (mp.amp_mode, mp.precision) == (AMPMode.AUTO, want)  # known right after the call
        learn.add_cb(probe := ConvDtype())
        learn.fit(1)
    assert set(probe.seen) == {DTYPE[want]} and mp.precision == want
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (mp.scaler is not None) == (want == 'fp16')  # a GradScaler exactly when fp16 trains
    assert len(fresh) == 1 and f"trains in {want} on cpu" in fresh[0], fresh  # said once, plainly
    if want == 'fp32':  # the loop runs as if the callback were not there
        assert 'no 16-bit mode trains faster than fp32' in fresh[0] and "amp_mode='bf16' or 'fp16' to force" in fresh[0]
        assert not any(cb is mp for e in ('after_pred', 'before_backward', 'before_step', 'after_step')
                       for cb, _ in learn._tables[True][e])


def test_cuda_is_fp16_with_a_scaler_as_fastai(fresh):
    "No probe on CUDA: fp16 runs on every GPU's fast path (decided here without a GPU: nothing runs on it)"
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
    for _ in range(3): make_learner().to_channelslast().fit(1)
    make_learner(cbs=MixedPrecision()).fit(1)
    assert len(fresh) == 1
    fp16._said.clear()
    monkeypatch.setattr(fp16, 'SAY_CHOICES', False)
    make_learner().to_channelslast().fit(1)
    assert len(fresh) == 1


def test_real_decision_agrees_with_real_training_steps():
    "On this machine: 'auto' never trains in a mode real steps find clearly slower, and takes one clearly faster"
    truth = train_step_ratios()
    choice = decide_amp('cpu')
    print(choice, {m: round(r, 2) for m, r in truth.items()})
    clear = {m: r for m, r in truth.items() if r > 1.5 or r < .7}
    if not clear: pytest.skip(f"no clear-cut ground truth on this machine (training step ratios {truth})")
    for m, r in clear.items():
        if r > 1.5: assert choice.precision != m, f"{m} trains {r:.2f}x fp32's step time, yet 'auto' chose it: {choice}"
    if any(r < .7 for r in clear.values()):
        assert choice.precision != 'fp32', f"a 16-bit mode trains clearly faster ({truth}), yet 'auto' chose fp32"


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
    "bf16 12x slower on real steps than the probe said: its settings run one block each (warm-up + timed), no more"
    seed(**KINDS['avx512_bf16'][0])
    learn, d, seen = auto_fit(cost_of(.010, .011, bf16=12.), warmup=1, block=2, rounds=4)
    assert seen[:d.steps].count(torch.bfloat16) == 2 * 3  # two layouts x (1 warm-up + 2 timed)
    assert d.steps == 4 * 3 + 3 * 2 * 3                  # round 1: 4 settings; rounds 2-4: the 2 fp32 ones


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
        ratios, want = KINDS[kind]
        seed(**ratios)
        dls = FaiDataLoaders.from_dsets(TensorDataset(*synth_images(8 * 40)), TensorDataset(*synth_images(16, seed=1)),
                                        bs=8, device='cpu')
        learn = FaiLearner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, cbs=(probe := ConvDtype()))
        learn.to_channelslast()
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
        assert learn.mixed_precision.precision == want and set(probe.seen) == {DTYPE[want]}
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
    assert (r0['alone'], r1['alone']) == ('bf16', 'fp32')  # each rank's own probe would choose differently
    assert r0['default'] == r1['default'] == 'bf16'        # one precision for all: rank 0's


def test_ddp_ranks_take_one_auto_decision(ddp_ranks):
    r0, r1 = ddp_ranks
    assert r1['candidates_alone'] == ['channels_last/fp32', 'contiguous/fp32']  # rank 1's probe ruled bf16 out
    assert r0['auto'] == r1['auto'] and r0['auto']['kept'] == 'channels_last/bf16', (r0['auto'], r1['auto'])
    assert r0['auto']['timed'] == ['channels_last/bf16', 'contiguous/bf16', 'channels_last/fp32', 'contiguous/fp32']
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
    assert trial.decision.precision == KINDS[kind][1]
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
