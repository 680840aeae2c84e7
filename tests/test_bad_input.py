"""Bad input and faults found by an outside probe (issue 14): each gets a clear error at the call (naming the
argument, the value and the fix) or a warning, and leaves the learner able to train."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb import bench
from channelslast_cb.core import Callback
from channelslast_cb.distributed import as_timeout  # noqa: F401 (also gives Learner its distrib_ctx)
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.guards import TerminateOnNaNCallback
from channelslast_cb.learner import DataLoaders, Learner, TensorBatches, accuracy
from helpers import synth_images, tiny_cnn


def dls(n_train=8, n_valid=4, bs=4, **kw):
    return DataLoaders.from_tensors(synth_images(n_train), valid=synth_images(n_valid, seed=1), bs=bs, shuffle=False, **kw)


def make_learner(model=None, **kw):
    kw.setdefault('loss_func', F.cross_entropy)
    return Learner(kw.pop('dls', None) or dls(), model or tiny_cnn(), progress=False, **kw)


def fit_quiet(learn, *args, **kw):
    learn.recorder.print_table = False
    return learn.fit(*args, **kw)


# --- 1. stale gradients ---------------------------------------------------------------------------------------

class InterruptAfterBackward(Callback):
    order = 0  # anywhere: it only raises
    def __init__(self): super().__init__(); self.fired = False
    def after_backward(self):
        if not self.fired: self.fired = True; raise KeyboardInterrupt


def first_step_delta(learn):
    "The change of the last layer's weight in a one-batch fit (one SGD step)"
    w0 = learn.model[-1].weight.detach().clone()
    fit_quiet(learn, 1)
    return learn.model[-1].weight.detach() - w0


def test_fit_starts_from_clean_gradients():
    # an interrupted batch leaves its gradients on the parameters: the next fit's first step must not add them
    make = lambda: make_learner(opt_func=torch.optim.SGD, lr=0.1, dls=dls(n_train=4))
    clean = first_step_delta(make())
    learn = make()
    with pytest.raises(KeyboardInterrupt):
        fit_quiet(learn, 1, cbs=InterruptAfterBackward())
    assert learn.model[-1].weight.grad is not None  # the interrupted batch's gradients are still there
    learn.model.load_state_dict(make().model.state_dict())  # same weights as `clean` started from
    delta = first_step_delta(learn)
    torch.testing.assert_close(delta, clean)  # was 2x `clean` before the fix


# --- 2. non-finite losses -------------------------------------------------------------------------------------

def nan_after(k):
    "A loss function that returns nan from its k-th call on"
    n = [0]
    def loss(pred, y):
        n[0] += 1
        l = F.cross_entropy(pred, y)
        return l * math.nan if n[0] > k else l
    return loss


def test_nan_loss_warns_once_with_the_step():
    learn = make_learner(loss_func=nan_after(3), dls=dls(n_train=24, bs=4))
    with pytest.warns(RuntimeWarning, match=r"training loss is nan at step 4 .*TerminateOnNaNCallback") as w:
        fit_quiet(learn, 2)
    assert len([x for x in w if 'training loss' in str(x.message)]) == 1  # once per fit, not once per step


def test_fp16_overflow_is_not_reported_as_a_nan_loss():
    # fp16's GradScaler skips a step whose loss/gradients are inf/nan, so the weights stay finite: the Recorder's
    # "weights are probably nan" warning would be wrong there (a whole epoch of skips has its own warning)
    learn = make_learner(loss_func=nan_after(3), dls=dls(n_train=24, bs=4))
    learn.add_cb(MixedPrecision('fp16'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fit_quiet(learn, 1)
    assert not [x for x in w if 'training loss' in str(x.message)]
    assert learn.mixed_precision.skipped_steps == 3  # steps 4-6 were skipped, not trained on
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_finite_loss_does_not_warn():
    learn = make_learner()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fit_quiet(learn, 1)


def test_terminate_on_nan_cancels_the_fit_at_the_first_nan():
    finite = lambda learn: all(torch.isfinite(p).all() for p in learn.model.parameters())
    learn = make_learner(loss_func=nan_after(3), dls=dls(n_train=40, bs=4), cbs=TerminateOnNaNCallback())
    with pytest.warns(RuntimeWarning, match=r"TerminateOnNaNCallback: the loss is nan at epoch 0, batch 3 \(training\)"):
        fit_quiet(learn, 3)
    assert learn.train_iter == 3  # batches 0-2 ran; batch 3's nan loss cancelled the fit before its backward
    assert len(learn.recorder.values) == 0  # no epoch finished
    assert finite(learn)  # the weights are the last finite step's
    without = make_learner(loss_func=nan_after(3), dls=dls(n_train=40, bs=4))
    with pytest.warns(RuntimeWarning, match='training loss is nan'): fit_quiet(without, 1)
    assert not finite(without)  # what it prevents
    assert TerminateOnNaNCallback.order < learn.recorder.order


# --- 3. fit_one_cycle / fit arguments -------------------------------------------------------------------------

@pytest.mark.parametrize('kw, match', [
    (dict(lr_max=-1.), r"lr_max must be a finite number > 0, got -1\.0: pass the peak"),
    (dict(lr_max=math.nan), r"lr_max.*nan"),
    (dict(lr_max='0.1'), r"lr_max.*'0\.1'"),
    (dict(div=0), r"div.*0"),
    (dict(div_final=math.inf), r"div_final.*inf"),
    (dict(pct_start='0.3'), r"pct_start.*'0\.3'"),
    (dict(pct_start=1.), r"pct_start.*1\.0"),
    (dict(moms=(0.9,)), r"moms must be None or 3 numbers.*got \(0\.9,\)"),
    (dict(moms=(2, 2, 2)), r"moms.*\(2, 2, 2\)"),
    (dict(moms=0.9), r"moms.*0\.9"),
    (dict(wd=-0.1), r"wd.*-0\.1"),
    (dict(wd=math.nan), r"wd.*nan"),
])
def test_fit_one_cycle_checks_its_arguments_at_the_call(kw, match):
    learn = make_learner()
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises((TypeError, ValueError), match=match):
        learn.fit_one_cycle(1, **kw)
    assert learn.opt is None  # nothing ran, not even the optimizer
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    fit_quiet(learn, 1)  # and the learner still trains


@pytest.mark.parametrize('kw, match', [(dict(lr=-1e-3), r"lr.*-0\.001"), (dict(lr=math.inf), r"lr.*inf"),
                                       (dict(lr=True), r"lr.*True"), (dict(wd=-1.), r"wd.*-1\.0")])
def test_fit_checks_lr_and_wd(kw, match):
    learn = make_learner()
    with pytest.raises((TypeError, ValueError), match=match): learn.fit(1, **kw)
    fit_quiet(learn, 1)


def test_learner_checks_lr_and_wd():
    with pytest.raises(ValueError, match=r"lr.*-1"): make_learner(lr=-1)
    with pytest.raises(ValueError, match=r"wd.*nan"): make_learner(wd=math.nan)


def test_one_cycle_still_trains_with_good_arguments():
    learn = make_learner()
    learn.recorder.print_table = False
    learn.fit_one_cycle(1, lr_max=1e-2, moms=None, wd=0.)
    assert len(learn.recorder.losses) == 2


# --- 4. empty and one-shot data -------------------------------------------------------------------------------

def batches(n=2):
    x, y = synth_images(4 * n)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 4 * n, 4)]


def test_empty_valid_set_is_refused_at_the_call():
    with pytest.raises(ValueError, match=r"`valid` has no batches.*valid=None"):
        DataLoaders(batches(), [])
    with pytest.raises(ValueError, match="`valid` has no batches"):
        DataLoaders(batches(), TensorBatches((torch.zeros(0, 3, 8, 8), torch.zeros(0).long())))


@pytest.mark.parametrize('which', ['train', 'valid'])
def test_one_shot_iterators_are_refused(which):
    gen = (b for b in batches())
    args = (gen, batches()) if which == 'train' else (batches(), gen)
    with pytest.raises(TypeError, match=rf"`{which}` is a one-shot iterator \(generator\).*list"):
        DataLoaders(*args)
    with pytest.raises(TypeError, match=rf"`{which}` is a one-shot iterator"):
        DataLoaders(*((iter(batches()), None) if which == 'train' else (batches(), iter(batches()))))


def test_validate_and_get_preds_on_empty_data_say_so():
    learn = make_learner()
    with pytest.raises(ValueError, match=r"`dl` has no batches"): learn.validate(dl=[])
    with pytest.raises(ValueError, match=r"`dl` has no batches"): learn.get_preds(dl=[])
    used = iter(batches()); list(used)  # an iterator already used up: no batches, found only by running it
    with pytest.raises(ValueError, match="no batches"): learn.validate(dl=used)
    used = iter(batches()); list(used)
    with pytest.raises(ValueError, match="no batches"): learn.get_preds(dl=used)
    assert len(learn.validate()) == 1 and learn.get_preds()[0].shape == (4, 2)  # still works after
    assert len(learn.validate(dl=iter(batches()))) == 1  # a fresh iterator is fine for one pass


# --- 5. clear messages ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('metrics, match', [
    (5, r"metrics must be a function.*got 5"), ('accuracy', r"metrics='accuracy' is a string.*metrics=accuracy"),
    ([accuracy, 'error_rate'], r"metric 'error_rate' is a string")])
def test_bad_metrics(metrics, match):
    with pytest.raises(TypeError, match=match): make_learner(metrics=metrics)


@pytest.mark.parametrize('cbs, match', [
    ('ChannelsLast', r"cbs='ChannelsLast' is a string.*class or an instance"), (5, r"cbs=5.*Callback"),
    ([Callback(), 'x'], r"cbs holds 'x', which is a string")])
def test_bad_cbs(cbs, match):
    with pytest.raises(TypeError, match=match): make_learner(cbs=cbs)
    learn = make_learner()
    with pytest.raises(TypeError, match=match): learn.fit(1, cbs=cbs)
    fit_quiet(learn, 1)


def test_float_metric_is_accepted():
    float_acc = lambda pred, y: (pred.argmax(1) == y).float().mean().item()
    learn = make_learner(metrics=[accuracy, float_acc])
    fit_quiet(learn, 1)
    vl, a, b = learn.validate()
    assert a == pytest.approx(b)


@pytest.mark.parametrize('loss, match', [
    (lambda p, y: F.cross_entropy(p, y).item(), r"loss_func .* returned a float.*tensor.*\.item\(\)"),
    (lambda p, y: F.cross_entropy(p, y, reduction='none'), r"loss_func .* returned a tensor of shape \(4,\).*reduc"),
    (lambda p, y: F.cross_entropy(p, y).detach(), r"loss_func .* does not require grad")])
def test_bad_loss_says_so_at_the_first_batch(loss, match):
    learn = make_learner(loss_func=loss)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match): fit_quiet(learn, 1)
    assert learn.train_iter == 0
    learn.loss_func = F.cross_entropy
    fit_quiet(learn, 1)


def test_bad_valid_loss_says_so_too():
    learn = make_learner(loss_func=lambda p, y: F.cross_entropy(p, y, reduction='none'))
    with pytest.raises(ValueError, match=r"returned a tensor of shape \(4,\)"): learn.validate()


@pytest.mark.parametrize('v', [True, False, math.nan, math.inf, '1'])
def test_max_grad_norm_must_be_a_number(v):
    with pytest.raises((TypeError, ValueError), match=rf"max_grad_norm.*{v!r}"): MixedPrecision('bf16', max_grad_norm=v)


def test_meta_model_is_refused_at_learner():
    with torch.device('meta'): model = tiny_cnn()
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"): make_learner(model)
    with pytest.raises(ValueError, match=r"'meta' device"): make_learner(tiny_cnn(), device='meta')


# --- 6. channelslast-bench output paths -----------------------------------------------------------------------

BENCH = ['test_resnet', '--img-size', '32', '--batch-size', '2', '--steps', '1', '--repeats', '1', '--warmup', '0',
         '--precision', 'fp32', '--device', 'cpu']


@pytest.mark.parametrize('flag, path, why', [
    ('--csv', '/proc/nope.csv', 'cannot create files in /proc'),
    ('--json', '{tmp}/afile/r.json', 'afile is a file, not a folder'),
    ('--plot', '{tmp}/adir.png', 'is a directory; give a file name')])
def test_bench_checks_every_output_path_before_timing(flag, path, why, tmp_path, capsys):
    (tmp_path / 'afile').write_text(''); (tmp_path / 'adir.png').mkdir()
    path = path.format(tmp=tmp_path)
    others = {'--csv': tmp_path / 'ok.csv', '--json': tmp_path / 'ok.json', '--plot': tmp_path / 'ok.png'}
    others[flag] = path
    with pytest.raises(SystemExit) as e:
        bench.main([*BENCH, *(str(a) for kv in others.items() for a in kv)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {path}: " in err and why in err
    assert 'round' not in err  # nothing was timed
    assert not any(p.exists() for k, p in others.items() if k != flag)  # no output written either


def test_bench_writes_the_outputs_it_can_and_names_the_one_that_failed(tmp_path, monkeypatch, capsys):
    files = {'--csv': tmp_path / 'r.csv', '--json': tmp_path / 'r.json', '--plot': tmp_path / 'r.png'}
    real = bench.iter_bench

    def run_then_break_csv(*args, **kwargs):
        yield from real(*args, **kwargs)
        files['--csv'].mkdir()  # a real fault after the checks: someone made a folder where the CSV goes
    monkeypatch.setattr(bench, 'iter_bench', run_then_break_csv)
    code = bench.main([*BENCH, *(str(a) for kv in files.items() for a in kv)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"could not write --csv {files['--csv']}" in err
    assert json.loads(files['--json'].read_text())['rows'][0]['model'] == 'test_resnet'
    assert files['--plot'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# --- 7. DDP: one layout for all ranks, and a timeout for a frozen rank ---------------------------------------

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    "What the two ranks of one `torchrun` launch of `ddp_badinput_worker.py` saw"
    from test_distributed import torchrun
    out = tmp_path_factory.mktemp('ddp_bad')
    torchrun('tests/ddp_badinput_worker.py', str(out), timeout=240)
    read = lambda name: json.loads((out / name).read_text())
    ranks = [read(f'rank{r}.json') for r in (0, 1)]
    return dict(auto=[r['auto'] for r in ranks], frozen=[r['frozen'] for r in ranks])


def test_auto_layout_under_ddp_is_one_decision_for_all_ranks(ddp):
    r0, r1 = ddp['auto']
    assert (r0['alone'], r1['alone']) == ('channels_last', 'contiguous')  # each rank alone would choose differently
    assert r0['decision'] == r1['decision'] == 'contiguous'  # the mean of the ranks' timings: 1.5 ms vs 2.0 ms
    assert r0['layout'] == r1['layout'] == 'contiguous' and r0['model_cl'] is r1['model_cl'] is False
    assert r0['vs_kept'] == r1['vs_kept'] == pytest.approx(2.0 / 1.5)  # channels-last's steps against contiguous'
    assert r0['dropped'] == r1['dropped'] == [None, None]  # alone, rank 0 would have dropped contiguous (2x) after round 1


def test_frozen_rank_fails_within_the_timeout(ddp):
    r0, r1 = ddp['frozen']
    assert 'error' in r0, r0  # rank 0's fit failed instead of waiting
    assert r0['elapsed'] < 60, r0  # distrib_ctx(timeout=10): seconds, not torch's default 30 minutes
    assert 'timeout' in r0['message'].lower() or 'timed out' in r0['message'].lower(), r0


@pytest.mark.parametrize('timeout, match', [('30', "timeout must be a number of seconds.*'30'"), (True, 'got True'),
                                            (0, r'finite time > 0 .*, got 0'), (math.inf, 'got inf')])
def test_distrib_ctx_checks_timeout(timeout, match):
    learn = make_learner()
    with pytest.raises((TypeError, ValueError), match=match):
        with learn.distrib_ctx(timeout=timeout): pass
