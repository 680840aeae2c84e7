"""The automatic layout choice, `ChannelsLast(auto=True)` / `learn.to_channelslast(auto=True)` (issue 5 §2), on the CPU.

No test here asserts which layout wins: that depends on the machine and its load. The decision logic itself is
tested with a fake clock (`cb._clock`), so that no real timing decides a test.
"""
import math
import statistics

import pytest
import torch

from channelslast_cb.autotune import AUTO_MARGIN, Setting
import torch.nn.functional as F

from helpers import synth_images, tiny_cnn_no_conv_bias

from channelslast_cb.channelslast import CHANNELS_LAST, CONTIGUOUS, ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner

CL = torch.channels_last


cnn = tiny_cnn_no_conv_bias
# 2 rounds x 2 layouts x (1 + 2) = 12 measuring steps; no early drop (real timings must not decide a test's shape)
WINDOW = dict(warmup=1, block=2, rounds=2, drop=100.)
N_WINDOW = 10  # round 1: 2 layouts x (1 warm-up + 1 timed); round 2: 2 x (1 + 2); then the rounds are 2


def make_learner(cbs=None, n_batches=16, bs=4, seed=0):
    dls = DataLoaders.from_tensors(synth_images(n_batches * bs, seed=seed), synth_images(8, seed=1), bs=bs, shuffle=False)
    learn = Learner(dls, cnn(), loss_func=F.cross_entropy, cbs=cbs, progress=False)
    learn.logged = []
    learn.log = learn.logged.append
    return learn


def is_cl(t): return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def layout_of(model) -> str: return CHANNELS_LAST if is_cl(model[0].weight) else CONTIGUOUS


class Trace(Callback):
    "After ChannelsLast: the layout of each training batch's input, and the number of optimizer steps taken"
    order = 0

    def __init__(self):
        super().__init__()
        self.inputs, self.steps = [], 0

    def after_pred(self):
        if self.learn.training: self.inputs.append(CHANNELS_LAST if is_cl(self.learn.xb[0]) else CONTIGUOUS)

    def after_step(self): self.steps += 1


def test_auto_picks_a_layout_logs_it_and_keeps_it():
    cb, trace = ChannelsLast(auto=True, **WINDOW), Trace()
    learn = make_learner([cb, trace])
    learn.fit(1)
    d = learn.channels_last.decision
    assert d is cb.decision and d.layout in (CHANNELS_LAST, CONTIGUOUS) and d.precision == 'fp32'
    # the whole window, or one round if the screen found one layout more than 2x slower (a real clock decides here)
    assert (d.steps, sorted(r['timed'] for r in d.table)) in ((N_WINDOW, [3, 3]), (4, [1, 1])), d
    times = {s.layout: v for s, v in cb.trial.times.items()}
    assert all(t > 0 for v in times.values() for t in v)
    # the decision pairs the two layouts round by round; contiguous is kept only when clearly faster (the margin)
    ratio = statistics.median(r[Setting(CONTIGUOUS, 'fp32')] / r[Setting(CHANNELS_LAST, 'fp32')] for r in cb.trial.round_times)
    assert d.layout == (CONTIGUOUS if ratio * (1 + AUTO_MARGIN) < 1 else CHANNELS_LAST)  # consistent with its own measurement
    other = next(r for r in d.table if not r['kept'])
    vs = statistics.median(r[other['setting']] / r[d.setting] for r in cb.trial.round_times)
    assert math.isclose(other['vs_kept'], vs)
    msg = [m for m in learn.logged if 'ChannelsLast(auto)' in m]
    assert len(msg) == 1 and msg[0].startswith(f"ChannelsLast(auto): kept {d.setting} (") and f"{other['vs_kept']:.2f}x" in msg[0]
    # the window alternated the layouts in blocks (warm-up steps included), then every step used the one chosen
    window = [CHANNELS_LAST] * 2 + [CONTIGUOUS] * 2 + ([CHANNELS_LAST] * 3 + [CONTIGUOUS] * 3) * (d.steps == N_WINDOW)
    assert trace.inputs[:d.steps] == window
    assert set(trace.inputs[d.steps:]) == {d.layout} and layout_of(learn.model) == d.layout
    # real training steps: one optimizer step per batch, none repeated or wasted
    assert trace.steps == 16 == len(learn.recorder.losses)
    assert learn.opt.state[learn.model[0].weight]['step'] == 16
    # the decision stays for later fits: no new measurement, the model starts in the layout chosen
    trace.inputs.clear()
    learn.fit(1)
    assert learn.channels_last.decision is d and trace.inputs == [d.layout] * 16


def fake_clock(cb, costs):
    "A clock that advances by half the step cost of the current layout at each reading (two readings per step)"
    t = [0.]

    def clock():
        t[0] += costs[cb.layout] / 2
        return t[0]
    return clock


@pytest.mark.parametrize('cheaper', [CHANNELS_LAST, CONTIGUOUS])
@pytest.mark.parametrize('amp', [None, 'bf16'])
def test_the_cheaper_layout_wins_and_everything_follows_it(cheaper, amp):
    "A fake clock decides: the model, the optimizer state and the inputs all end in the layout with cheaper steps"
    cb, trace = ChannelsLast(auto=True, **WINDOW), Trace()
    other = CONTIGUOUS if cheaper == CHANNELS_LAST else CHANNELS_LAST
    cb._clock = fake_clock(cb, {cheaper: 1e-3, other: 1.3e-3})  # not "clearly slower": timed for every round
    learn = make_learner([cb, trace] + ([MixedPrecision(amp)] if amp else []))
    learn.fit(1)
    d = cb.decision
    assert (d.layout, d.precision) == (cheaper, amp or 'fp32')
    assert [r['dropped_after'] for r in d.table] == [None, None]
    assert math.isclose(next(r['vs_kept'] for r in d.table if not r['kept']), 1.3)
    assert set(trace.inputs[N_WINDOW:]) == {cheaper} and layout_of(learn.model) == cheaper
    st = learn.opt.state[learn.model[0].weight]
    assert {is_cl(st['exp_avg']), is_cl(st['exp_avg_sq'])} == {cheaper == CHANNELS_LAST}
    assert any(m.startswith(f'ChannelsLast(auto): kept {cheaper}/') for m in learn.logged), learn.logged


def test_a_clearly_slower_layout_is_dropped_after_its_first_block():
    cb, trace = ChannelsLast(auto=True, **{**WINDOW, 'drop': 1.5}), Trace()
    cb._clock = fake_clock(cb, {CHANNELS_LAST: 3e-3, CONTIGUOUS: 1e-3})
    learn = make_learner([cb, trace])
    learn.fit(1)
    d = cb.decision
    assert d.layout == CONTIGUOUS and d.steps == 4  # one round: 2 layouts x (1 warm-up + 1 timed); 3x: dropped, decided
    assert [r['dropped_after'] for r in d.table] == [1, None]
    assert trace.inputs == [CHANNELS_LAST] * 2 + [CONTIGUOUS] * 14


def final_weights(learn):
    learn.fit(1)
    return [p.detach().contiguous() for p in learn.model.parameters()]


def test_auto_trains_like_a_fixed_layout():
    auto = final_weights(make_learner(ChannelsLast(auto=True, **WINDOW)))
    fixed_cl = final_weights(make_learner(ChannelsLast()))
    plain = final_weights(make_learner())
    for a, c, p in zip(auto, fixed_cl, plain):
        torch.testing.assert_close(a, p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, p, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings('ignore::channelslast_cb.fp16.AMPSpeedWarning')  # bf16 may be measured slow on a CPU
def test_auto_with_bf16_mixed_precision():
    learn = make_learner().to_channelslast(amp_mode='bf16', auto=True)
    assert learn.channels_last.auto and learn.mixed_precision.amp_mode.value == 'bf16'
    assert learn.channels_last.trial is None and learn.mixed_precision.precision == 'bf16'  # a fixed mode: layouts only
    learn = make_learner([ChannelsLast(auto=True, **WINDOW), MixedPrecision('bf16')])
    dtypes = []
    learn.model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    auto = final_weights(learn)
    d = learn.channels_last.decision
    assert d is not None and d.precision == 'bf16' and (d.steps, sorted(r['timed'] for r in d.table)) in ((N_WINDOW, [3, 3]), (4, [1, 1]))
    assert set(dtypes) == {torch.bfloat16}  # every step, in both layouts, ran in bf16
    fixed = final_weights(make_learner().to_channelslast(amp_mode='bf16'))
    plain = final_weights(make_learner().to_bf16())
    for a, f, p in zip(auto, fixed, plain):  # bf16 rounds differently in each layout's kernels: bf16 tolerance
        torch.testing.assert_close(a, p, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(f, p, rtol=2e-2, atol=2e-3)


def test_a_fit_shorter_than_the_window_goes_on_measuring_in_the_next():
    cb, trace = ChannelsLast(auto=True, **WINDOW), Trace()
    cb._clock = fake_clock(cb, {CHANNELS_LAST: 1e-3, CONTIGUOUS: 1.1e-3})
    learn = make_learner([cb, trace], n_batches=8)
    learn.fit(1)
    assert cb.decision is None and cb.trial.steps == 8
    assert any('ended after 8 measuring steps, before the decision' in m for m in learn.logged), learn.logged
    assert layout_of(learn.model) == cb.layout  # the model is in one layout, consistent with the callback
    learn.fit(1)  # resumes in contiguous's round-2 block (its warm-up ran): one untimed cold step, then its 2 timed
    d = cb.decision
    assert d is not None and [r['timed'] for r in d.table] == [3, 3] and d.steps == 11
    assert trace.inputs[8:11] == [CONTIGUOUS] * 3
    assert set(trace.inputs[11:]) == {d.layout}
    # and it trained like a fixed layout through both fits
    plain = make_learner(n_batches=8)
    plain.fit(1); plain.fit(1)
    for a, p in zip(learn.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a.detach().contiguous(), p.detach(), rtol=1e-4, atol=1e-5)


def test_validate_and_get_preds_during_and_after_measuring():
    cb = ChannelsLast(auto=True, **WINDOW)
    learn = make_learner(cb, n_batches=4)
    learn.fit(1)  # 4 of 12 steps
    k = cb.trial.steps
    preds, _ = learn.get_preds()
    assert cb.trial.steps == k and cb.decision is None  # no measuring outside training
    assert preds.shape == (8, 2) and preds.is_contiguous()
    learn.validate()
    assert cb.trial.steps == k


def test_fixed_layout_path_has_no_auto_bookkeeping():
    fixed, auto = ChannelsLast(), ChannelsLast(auto=True)
    assert 'before_batch' not in vars(fixed) and 'after_step' not in vars(fixed)
    assert fixed.handler('before_batch').__func__ is ChannelsLast.before_batch
    assert fixed.handler('after_step') is None and fixed.trial is None
    assert auto.handler('after_step') is not None and auto.handler('before_batch').__func__ is not ChannelsLast.before_batch


@pytest.mark.parametrize('kept', [CHANNELS_LAST, CONTIGUOUS])
def test_once_decided_the_loop_runs_as_with_a_fixed_layout(kept):
    "The measuring handlers go: channels-last keeps only the fixed before_batch, contiguous has no per-batch handler"
    cb = ChannelsLast(auto=True, **WINDOW)
    cb._clock = fake_clock(cb, {kept: 1e-3, CONTIGUOUS if kept == CHANNELS_LAST else CHANNELS_LAST: 1.2e-3})
    learn = make_learner(cb)
    learn.fit(1)
    assert cb.decision.layout == kept and 'before_batch' not in vars(cb) and cb.handler('after_step') is None
    handlers = [e for e in ('before_batch', 'after_pred', 'after_step') if any(c is cb for c, _ in learn._tables[True][e])]
    assert handlers == (['before_batch'] if kept == CHANNELS_LAST else [])


def test_to_channelslast_auto_keeps_a_decision_and_can_measure_afresh():
    learn = make_learner(n_batches=34).to_channelslast(use_amp=False, auto=True)  # the default window is 32 steps
    learn.fit(1)
    cb, d = learn.channels_last, learn.channels_last.decision
    assert d is not None
    learn.to_channelslast(use_amp=False, auto=True)
    assert learn.channels_last is cb and cb.decision is d
    learn.to_contiguous().to_channelslast(use_amp=False, auto=True)
    assert learn.channels_last is not cb and learn.channels_last.decision is None
    assert layout_of(learn.model) == CHANNELS_LAST  # a new auto callback starts measuring in channels-last
