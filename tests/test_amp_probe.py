"""The precision decision on the CPU: a mode is judged by what runs (a cached probe), never by the CPU's flags alone.

The decision logic is driven by injected measurements (a seeded `AMP_SPEEDS` cache, a replaced `measure_amp_speed`,
a fake probe clock), so these tests can fail on any machine. One test runs the real probe and checks its verdict
against real training steps of a small CNN timed in the test, where that ground truth is clear-cut. Also here:
the `SkippedStepsWarning` of an epoch whose every fp16 step was skipped, and the benchmark's default precisions."""
import json
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import channelslast_cb.bench as bench
import channelslast_cb.fp16 as fp16
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import (AMPMode, AMPSpeed, AMPSpeedWarning, MixedPrecision, SkippedStepsWarning, amp_speed,
                                  check_amp_speed, measure_amp_speed)
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn

FP16, BF16 = AMPMode.FP16, AMPMode.BF16


@pytest.fixture
def fresh(monkeypatch):
    "An empty probe cache and no warning given yet in this process"
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {})
    monkeypatch.setattr(fp16, '_warned', set())


def seed(fp16_speed, bf16_speed=(1., True), capped=False):
    "Seed the cache with `(ratio, native)` per mode, as a probe on some CPU would have measured"
    fp16.AMP_SPEEDS.update({('cpu', FP16): AMPSpeed('cpu', FP16, *fp16_speed, capped=capped),
                            ('cpu', BF16): AMPSpeed('cpu', BF16, *bf16_speed)})


def make_learner(cbs=None, n=64, bs=16, loss_func=F.cross_entropy):
    dls = DataLoaders.from_tensors(synth_images(n), valid=synth_images(16, seed=1), bs=bs, shuffle=False)
    return Learner(dls, tiny_cnn(), loss_func=loss_func, cbs=cbs, lr=1e-2, progress=False)


def slow_warnings(w): return [str(x.message) for x in w if issubclass(x.category, AMPSpeedWarning)]


# ---------------------------------------------------------------- the decision, from injected measurements

@pytest.mark.parametrize('name, fp16_speed, bf16_speed, capped, expect', [
    # the Intel Xeon of issue 9: flags promise native fp16, the fp16 convolution backward is 200x slower
    ('flags yes, measured pathological', (212., True), (.4, True), True,
     ['at least 212.0x', "flags promise native float16 (torch.ops.mkldnn._is_mkldnn_fp16_supported() is True)",
      'Use learn.to_bf16() instead (bf16 measured 0.40x']),
    # this project's AMD EPYC: no AVX512-FP16, fp16 about 5x slower, bf16 fine
    ('flags no, measured slow', (5.6, False), (1.02, True), False,
     ['took 5.6x', 'no native float16 arithmetic (AVX512-FP16 or AMX-FP16)', 'Use learn.to_bf16() instead']),
    ('both slow: fp32 is the way out', (4., False), (3.5, False), False,
     ['took 4.0x', 'Use learn.to_fp32() instead (bf16 is slow here too: 3.5x)']),
    ('flags unknown', (2.5, None), (1., None), False, ['took 2.5x', 'torch cannot tell whether this CPU has native']),
    ('flags no, measured fast: no warning', (1.3, False), (1., True), False, None),
    ('flags yes, measured fast: no warning', (.6, True), (.5, True), False, None),
    ('at the threshold: not slow', (2., True), (1., True), False, None),
])
def test_fp16_verdict_from_injected_measurements(fresh, name, fp16_speed, bf16_speed, capped, expect):
    seed(fp16_speed, bf16_speed, capped)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        speed = check_amp_speed('fp16', 'cpu')
    assert speed.ratio == fp16_speed[0] and speed.slow == (expect is not None)
    msgs = slow_warnings(w)
    if expect is None: assert msgs == []
    else:
        assert len(msgs) == 1, msgs
        for part in expect + ['fp16 mixed precision trains much slower than fp32', 'stays fp16 as asked']:
            assert part in msgs[0], (part, msgs[0])


def test_threshold_is_the_module_constant(fresh, monkeypatch):
    seed((5.6, False))
    assert amp_speed('fp16', 'cpu').slow
    monkeypatch.setattr(fp16, 'AMP_SLOW_RATIO', 10.)
    assert not amp_speed('fp16', 'cpu').slow


def test_probe_runs_once_per_process_and_device_type(fresh, monkeypatch):
    calls = []
    def fake(mode):
        calls.append(AMPMode(mode))
        return AMPSpeed('cpu', AMPMode(mode), 7. if mode is FP16 else .8, False)
    monkeypatch.setattr(fp16, 'measure_amp_speed', fake)
    for _ in range(3):
        assert amp_speed('fp16', 'cpu').ratio == 7. and amp_speed('bf16', torch.device('cpu')).ratio == .8
    assert calls == [FP16, BF16]
    assert amp_speed('fp16', 'cuda:0') is None and amp_speed('bf16', 'meta') is None  # not probed there
    assert calls == [FP16, BF16]
    with pytest.warns(AMPSpeedWarning, match=r'took 7\.0x.*Use learn.to_bf16\(\) instead \(bf16 measured 0\.80x'):
        check_amp_speed('fp16', 'cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_amp_speed('fp16', 'cpu')  # once per process: no second warning


def fake_clock(cost):
    "A probe clock under which every fp32 step costs 1 and every autocast step `cost` (the probe alternates them)"
    state = dict(calls=0, t=0.)
    def clock():
        n = state['calls']; state['calls'] += 1
        state['t'] += 1. if n % 4 == 1 else cost if n % 4 == 3 else 0.
        return state['t']
    return clock, state


@pytest.mark.parametrize('cost, slow, capped, steps', [
    (50., True, True, 6),     # pathological: stopped after the tiny size's warm-up and 2 rounds (3 steps per mode)
    (3., True, False, 20),    # slow: both sizes, 1 + 3 and 1 + 5 rounds
    (1.2, False, False, 20),  # fine
])
def test_probe_caps_a_pathological_mode(monkeypatch, cost, slow, capped, steps):
    clock, state = fake_clock(cost)
    monkeypatch.setattr(fp16, '_probe_clock', lambda: clock)
    s = measure_amp_speed('bf16', max_seconds=60.)  # a wall-clock budget that a loaded machine cannot hit
    assert (s.ratio, s.slow, s.capped) == (pytest.approx(cost), slow, capped)
    assert state['calls'] == 2 * steps, state  # two clock reads per step
    assert s.device_type == 'cpu' and s.mode is BF16 and s.native == fp16.cpu_native(torch.bfloat16)


def test_probe_leaves_the_caller_as_it_was():
    threads = torch.get_num_threads()
    torch.manual_seed(0); a = torch.rand(3)
    torch.manual_seed(0)
    with torch.no_grad():
        s = measure_amp_speed('bf16', rounds=1)
        assert not torch.is_grad_enabled()
    b = torch.rand(3)
    assert torch.equal(a, b) and torch.get_num_threads() == threads and s.ratio > 0 and s.seconds > 0


# ---------------------------------------------------------------- every place that picks a mode says it at once

def test_to_fp16_to_bf16_and_to_channelslast_warn_at_the_call(fresh):
    seed((150., True), (4., False))
    for call, mode in ((lambda l: l.to_fp16(), FP16), (lambda l: l.to_bf16(), BF16),
                       (lambda l: l.to_channelslast(amp_mode='fp16'), FP16), (lambda l: l.to_channelslast(amp_mode='bf16'), BF16)):
        fp16._warned.clear()
        learn = make_learner()
        with pytest.warns(AMPSpeedWarning, match=f'{mode} mixed precision trains much slower than fp32') as w:
            call(learn)
        assert 'Use learn.to_fp32() instead' in str(w[0].message)
        assert learn.mixed_precision.amp_mode is mode  # never changed behind the user's back


def test_mixed_precision_in_cbs_warns_at_before_fit(fresh):
    seed((8., False), (1., True))
    learn = make_learner(cbs=MixedPrecision('fp16'))
    with pytest.warns(AMPSpeedWarning, match=r'took 8\.0x'): learn.fit(1)
    assert learn.mixed_precision.amp_mode is FP16


def test_channels_last_auto_warns_before_its_window(fresh):
    seed((150., True), (.5, True))
    learn = make_learner(cbs=[ChannelsLast(auto=True, warmup=0, block=1, rounds=2), MixedPrecision('fp16')], n=128)
    learn.log = lambda m: None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(1)
    msgs = slow_warnings(w)
    auto = [m for m in msgs if 'ChannelsLast(auto=True) times its measuring steps (2 in its first round) in this mode' in m]
    assert len(auto) == 1 and 'took 150.0x' in auto[0] and 'Use learn.to_bf16() instead' in auto[0], msgs
    assert len(msgs) == 2  # and MixedPrecision's own, once
    assert learn.channels_last.decision is not None


def test_no_warning_on_a_mode_measured_fast(fresh):
    seed((1.1, False), (.7, True))  # flags say no native fp16: the measurement says fine, and decides
    with warnings.catch_warnings():
        warnings.simplefilter('error', AMPSpeedWarning)
        make_learner().to_channelslast(auto=True).fit(1)
        make_learner().to_bf16().fit(1)


# ---------------------------------------------------------------- the real probe against real training steps

def train_step_ratios(modes=('fp16', 'bf16'), rounds=5):
    """Median over paired rounds of (training step in `mode` / fp32 step) for a small CNN (16 images of 32 px,
    three convolutions, AdamW, fp16 with a GradScaler): CPU time of one thread, like the probe, so that the load of
    other processes does not decide it"""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(memory_format=torch.channels_last)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    nets = {m: make() for m in ('fp32', *modes)}
    scaler = torch.amp.GradScaler('cpu')
    def step(mode):
        net, opt = nets[mode]
        t = time.thread_time()
        dtype = torch.float32 if mode == 'fp32' else AMPMode(mode).dtype
        with torch.autocast('cpu', dtype=dtype, enabled=mode != 'fp32'): out = net(x)
        loss = F.cross_entropy(out.float(), y)
        if mode == 'fp16':
            scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        else: loss.backward(); opt.step()
        opt.zero_grad()
        return time.thread_time() - t
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in nets: step(m)  # warm-up
        ratios = {m: [] for m in modes}
        for _ in range(rounds):
            t32 = step('fp32')
            for m in modes: ratios[m].append(step(m) / t32)
    finally: torch.set_num_threads(threads)
    return {m: statistics.median(r) for m, r in ratios.items()}


def test_real_probe_agrees_with_real_training_steps():
    truth = train_step_ratios()
    probe = {m: measure_amp_speed(m) for m in truth}
    print({m: (round(truth[m], 2), str(probe[m])) for m in truth})
    clear = {m: r for m, r in truth.items() if r > 3 or r < 1.5}
    if not clear: pytest.skip(f"no clear-cut ground truth on this machine (training step ratios {truth})")
    for m, r in clear.items():
        assert probe[m].slow == (r > 3), (f"{m}: training steps take {r:.2f}x fp32's time, the probe says "
                                          f"{probe[m]}")


# ---------------------------------------------------------------- fp16: an epoch whose every step was skipped

def inf_loss(pred, y): return F.cross_entropy(pred, y) * float('inf')


@pytest.mark.filterwarnings('ignore::channelslast_cb.fp16.AMPSpeedWarning')
def test_warns_when_every_step_of_an_epoch_was_skipped():
    learn = make_learner(cbs=MixedPrecision('fp16'), loss_func=inf_loss)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(3)
    msgs = [str(x.message) for x in w if issubclass(x.category, SkippedStepsWarning)]
    assert len(msgs) == 3, msgs  # one per epoch, each with that epoch's number and the scale it fell to
    for epoch, (msg, scale) in enumerate(zip(msgs, (2.**12, 2.**8, 2.**4))):
        assert f'all 4 optimizer step(s) of epoch {epoch} were skipped' in msg
        assert f'the loss scale fell to {scale:g} (init_scale 65536)' in msg and 'Check the loss in fp32' in msg
    assert learn.mixed_precision.skipped_steps == 12 and learn.mixed_precision.scaler.get_scale() == 16.
    assert issubclass(SkippedStepsWarning, RuntimeWarning)


@pytest.mark.filterwarnings('ignore::channelslast_cb.fp16.AMPSpeedWarning')
def test_no_skipped_epoch_warning_when_a_step_went_through():
    def poison(cb):  # every step but the last of each epoch overflows
        if cb.iter < 3: next(cb.model.parameters()).grad.view(-1)[0] = float('inf')
    learn = make_learner(cbs=[MixedPrecision('fp16'), Callback(after_backward=poison)])
    with warnings.catch_warnings():
        warnings.simplefilter('error', SkippedStepsWarning)
        learn.fit(2)
    assert learn.mixed_precision.skipped_steps == 6
    # bf16 has no scaler and skips nothing: an inf loss is not its business here (issue 14's NaN warning is)
    with warnings.catch_warnings():
        warnings.simplefilter('error', SkippedStepsWarning)
        warnings.simplefilter('ignore', RuntimeWarning)
        make_learner(cbs=MixedPrecision('bf16'), loss_func=inf_loss).fit(1)


# ---------------------------------------------------------------- the benchmark's precisions

def test_bench_default_leaves_out_a_slow_mode_and_explicit_still_runs(fresh):
    seed((150., True), (.9, True))
    cpu = torch.device('cpu')
    default, left = bench.default_precisions(cpu)
    assert default == ['fp32', 'bf16'] and list(left) == ['fp16'] and 'took 150.0x' in left['fp16']
    assert bench.check_precisions(None, cpu) == ['fp32', 'bf16']
    with pytest.warns(AMPSpeedWarning, match='channelslast-bench runs fp16 because it was asked for'):
        assert bench.check_precisions(['fp32', 'fp16'], cpu) == ['fp32', 'fp16']


def test_bench_cli_says_what_it_left_out(fresh, tmp_path, capsys, monkeypatch):
    seed((150., True), (.9, True))
    monkeypatch.setattr(bench, 'matmul_peak', lambda device, precision='fp32', **kw: 1.)  # its 2048^2 matmuls: not the point here
    out = tmp_path / 'r.json'
    assert bench.main(['test_resnet', '--img-size', '16', '--batch-size', '2', '--steps', '1', '--repeats', '1',
                       '--warmup', '0', '--device', 'cpu', '--quiet', '--json', str(out)]) == 0
    err = capsys.readouterr().err
    assert 'channelslast-bench: left out fp16: a probe training step took 150.0x' in err
    assert 'run it anyway with --precision fp16' in err
    d = json.loads(out.read_text())
    assert {r['precision'] for r in d['rows']} == {'fp32', 'bf16'}
    assert list(d['meta']['precisions_left_out']) == ['fp16']


def test_a_mode_that_cannot_take_effect_is_not_probed(fresh, monkeypatch):
    "autocast turning itself off: nothing to measure; the call still works and the fit raises (check_amp_support)"
    monkeypatch.setattr(torch, 'is_autocast_enabled', lambda *a: False)
    assert amp_speed('bf16', 'cpu') is None and fp16.AMP_SPEEDS == {}
    learn = make_learner().to_bf16()
    with pytest.raises(RuntimeError, match='does not support torch.bfloat16.*silently train in float32'): learn.fit(1)
