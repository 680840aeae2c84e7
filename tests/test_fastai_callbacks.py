"""fastai's own callbacks, imported from fastai 2.8 (not copied), on OUR `Learner`: plain, and after
`learn.to_channelslast(amp_mode='bf16')`. Each case asserts what the callback is for (the learning rate moved,
gradients were clipped, a file was written, training stopped early...), not only that nothing raised.

fastai patches `fit_flat_cos`, `fit_sgdr` and `lr_find` onto *its* `Learner`; the tests call those functions on
ours (`FastaiLearner.fit_flat_cos(learn, ...)`), as a user would.
"""
import csv
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from channelslast_cb.all import Callback, DataLoaders, Learner, accuracy
from channelslast_cb.fp16 import check_amp_support
from helpers import synth_images, tiny_cnn

fastai = pytest.importorskip('fastai', reason="fastai is not installed: these tests run fastai's own callbacks")
import matplotlib  # noqa: E402

matplotlib.use('Agg')
from fastai.callback.core import Callback as FastaiCallback  # noqa: E402
from fastai.callback.data import CollectDataCallback  # noqa: E402
from fastai.callback.mixup import CutMix, MixUp  # noqa: E402
from fastai.callback.progress import CSVLogger, ShowGraphCallback  # noqa: E402
from fastai.callback.schedule import ParamScheduler, SchedCos  # noqa: E402
from fastai.callback.tracker import (EarlyStoppingCallback, ReduceLROnPlateau, SaveModelCallback,  # noqa: E402
                                    TerminateOnNaNCallback, TrackerCallback)
from fastai.callback.training import GradientAccumulation, GradientClip, ShortEpochCallback  # noqa: E402
from fastai.learner import Learner as FastaiLearner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.optimizer import Adam as FastaiAdam, OptimWrapper  # noqa: E402

CL = torch.channels_last
N_TRAIN, N_VALID, BS = 32, 16, 8   # 4 training batches and 2 validation batches per epoch
LR = 1e-2


def _bf16_ok():
    try: check_amp_support('bf16', 'cpu')
    except RuntimeError: return False
    return True


LAYOUTS = ['plain', pytest.param('cl_bf16', marks=pytest.mark.skipif(not _bf16_ok(), reason="no CPU bf16 autocast"))]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(layout, cbs=None, loss_func=F.cross_entropy, metrics=accuracy, tmp_path=None, **kw):
    dls = DataLoaders.from_tensors(synth_images(N_TRAIN), valid=synth_images(N_VALID, seed=1), bs=BS)
    learn = Learner(dls, tiny_cnn(), loss_func=loss_func, metrics=metrics, lr=LR, cbs=cbs,
                    progress=kw.pop('progress', False), path=tmp_path or '.', **kw)
    learn.recorder.print_table = False
    if layout == 'cl_bf16': learn.to_channelslast(amp_mode='bf16')
    return learn


def is_cl(t): return t.is_contiguous(memory_format=CL)


def weights(learn): return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def same_weights(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def Probe(order=100, **fns):
    "Our callback calling `fns[event](learn)` at each given event, results in `.log`; `order` places it around the one tested"
    cb = Callback(**{e: (lambda f: lambda self: self.log.append(f(self.learn)))(f) for e, f in fns.items()})
    cb.order, cb.log = order, []
    return cb


# ---------------------------------------------------------------- the table: one function per fastai callback

def grad_norm(learn):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in learn.model.parameters()
                                                       if p.grad is not None])))


def case_gradient_clip(layout, tmp_path):
    clipped = make(layout, cbs=[GradientClip(max_norm=1e-3), probe := Probe(order=100, before_step=grad_norm)])
    clipped.fit(1)
    free = make(layout, cbs=[free_probe := Probe(order=100, before_step=grad_norm)])
    free.fit(1)
    assert len(probe.log) == N_TRAIN // BS
    assert max(probe.log) <= 1e-3 * 1.001, probe.log          # every step's gradient norm was clipped
    assert min(free_probe.log) > 1e-2, free_probe.log          # ...and would not have been that small


def case_gradient_accumulation(layout, tmp_path):
    pairs = lambda learn: (float(learn.loss), float(learn.loss_grad.detach()))
    learn = make(layout, cbs=[GradientAccumulation(n_acc=2 * BS), probe := Probe(order=100, after_loss=pairs)])
    learn.fit(1)
    steps = {int(s['step']) for s in learn.opt.state.values()}
    assert steps == {N_TRAIN // BS // 2}                        # one optimizer step per two batches
    train = probe.log[:N_TRAIN // BS]
    assert all(math.isclose(l, 2 * g, rel_tol=1e-6) for l, g in train), train  # `loss` is not divided with `loss_grad`
    assert learn.recorder.batch_losses == pytest.approx([l for l, _ in train], rel=1e-6)


def case_tracker(layout, tmp_path):
    learn = make(layout, cbs=(tracker := TrackerCallback(monitor='valid_loss')))
    learn.fit(3)
    assert tracker.best == min(learn.recorder.column('valid_loss'))


def case_early_stopping(layout, tmp_path):
    learn = make(layout, cbs=EarlyStoppingCallback(monitor='valid_loss', min_delta=10., patience=1))
    learn.fit(5)
    assert len(learn.recorder.values) == 2 and learn.epoch == 1  # epoch 1 did not improve by 10: stopped


def case_save_model_at_end(layout, tmp_path):
    learn = make(layout, cbs=SaveModelCallback(at_end=True, fname='final'), tmp_path=tmp_path)
    learn.fit(2)
    assert (tmp_path / 'models' / 'final.pth').exists()
    other = make(layout, tmp_path=tmp_path).load('final', with_opt=False)
    assert same_weights(weights(other), weights(learn))


def case_save_model_every_epoch(layout, tmp_path):
    learn = make(layout, cbs=SaveModelCallback(every_epoch=True), tmp_path=tmp_path)
    learn.fit(2)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['model_0.pth', 'model_1.pth']


def _epoch_marker(learn):
    "A metric named `marker` whose best (largest) value is at epoch 0"
    def marker(pred, targ): return torch.tensor(-float(learn.epoch))
    return marker


def case_save_model_best(layout, tmp_path):
    if 'weights_only' not in inspect.signature(Learner.load).parameters:
        pytest.xfail("fastai's SaveModelCallback calls learn.load(..., weights_only=False): Learner.load needs "
                     "fastai's load keywords (issue 13, checkpoints)")
    learn = make(layout, tmp_path=tmp_path, metrics=[])
    learn.metrics = [_epoch_marker(learn)]
    epoch_w = Probe(order=100, after_epoch=weights)
    learn.fit(3, cbs=[SaveModelCallback(monitor='marker'), epoch_w])
    assert same_weights(weights(learn), epoch_w.log[0])       # the best epoch (0) was loaded back at the end
    assert not same_weights(epoch_w.log[0], epoch_w.log[-1])


def case_save_model_skipped_by_get_preds(layout, tmp_path):
    "fastai's TrackerCallback sets `run = False` during get_preds: `Callback.run` must be honoured"
    learn = make(layout, cbs=SaveModelCallback(at_end=True), tmp_path=tmp_path)
    learn.fit(1)
    (tmp_path / 'models' / 'model.pth').unlink()
    learn.get_preds()
    assert not (tmp_path / 'models' / 'model.pth').exists()
    learn.fit(1)                                               # `run` is back on for the next fit
    assert (tmp_path / 'models' / 'model.pth').exists()


def case_reduce_lr_on_plateau(layout, tmp_path):
    learn = make(layout, cbs=ReduceLROnPlateau(monitor='valid_loss', min_delta=10., patience=1, factor=10.))
    learn.fit(3)
    n = N_TRAIN // BS
    lrs = learn.recorder.lrs
    # epoch 0 is the first best; epochs 1 and 2 do not improve by 10, so each lowers the lr tenfold after it
    assert lrs == pytest.approx([LR] * 2 * n + [LR / 10] * n)
    assert learn.opt.param_groups[0]['lr'] == pytest.approx(LR / 100)


def case_show_graph(layout, tmp_path):
    learn = make(layout, cbs=ShowGraphCallback(), progress=True)
    learn.fit(2)
    (xs, ys), (vx, vy) = learn.progress.mbar.graphs
    assert ys == pytest.approx(learn.recorder.losses) and xs == list(range(2 * N_TRAIN // BS))
    assert vx == [N_TRAIN // BS, 2 * N_TRAIN // BS] and vy == pytest.approx(learn.recorder.column('valid_loss'))
    assert len(learn.progress.mbar.fig.axes[0].lines) == 2


def case_param_scheduler(layout, tmp_path):
    learn = make(layout, cbs=(sched := ParamScheduler({'lr': SchedCos(1e-2, 1e-4)})))
    learn.fit(2)
    lrs = learn.recorder.lrs
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learn.recorder.hps['lr'] == pytest.approx(lrs)      # ParamScheduler's own record agrees


def _needs_start_epoch():
    if 'start_epoch' not in inspect.signature(Learner.fit).parameters:
        pytest.xfail("fastai's fit_flat_cos/fit_sgdr call learn.fit(..., start_epoch=...): Learner.fit needs "
                     "`start_epoch` (issue 13, checkpoints and resume)")


def case_fit_flat_cos(layout, tmp_path):
    _needs_start_epoch()
    learn = make(layout)
    FastaiLearner.fit_flat_cos(learn, 4, lr=2e-2)
    lrs, n = learn.recorder.lrs, 4 * N_TRAIN // BS
    k = 3 * n // 4                                              # flat for pct_start=0.75, then a cosine down
    assert lrs[:k + 1] == pytest.approx([2e-2] * (k + 1)) and all(a > b for a, b in zip(lrs[k:], lrs[k + 1:]))
    assert lrs[-1] < 4e-3


def case_fit_sgdr(layout, tmp_path):
    _needs_start_epoch()
    learn = make(layout)
    FastaiLearner.fit_sgdr(learn, 2, 1, lr_max=2e-2)           # cycles of 1 then 2 epochs
    lrs, n = learn.recorder.lrs, N_TRAIN // BS
    assert lrs[0] == pytest.approx(2e-2) and lrs[n] == pytest.approx(2e-2) and lrs[n - 1] < 1e-2


def case_lr_find(layout, tmp_path):
    learn = make(layout, tmp_path=tmp_path)
    w0 = weights(learn)
    res = FastaiLearner.lr_find(learn, start_lr=1e-5, end_lr=1, num_it=12, show_plot=False)
    lrs = learn.recorder.lrs
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))  # grows exponentially
    assert 1e-5 <= res.valley <= 1
    assert same_weights(weights(learn), w0)                    # LRFinder loads back the weights it saved
    assert not (tmp_path / 'models').exists() or not any((tmp_path / 'models').rglob('*.pth'))


def _mix_probes():
    before = Probe(order=-5, before_batch=lambda learn: learn.xb[0].detach().clone())   # before MixUp (order 0)
    after = Probe(order=5, before_batch=lambda learn: (learn.xb[0].detach().clone(), learn.training,
                                                        learn.loss_func))
    return before, after


def case_mixup(layout, tmp_path):
    before, after = _mix_probes()
    learn = make(layout, cbs=[(mix := MixUp(0.4)), before, after], loss_func=CrossEntropyLossFlat(), metrics=[])
    lf = learn.loss_func
    learn.fit(1)
    for x0, (x1, training, loss_func) in zip(before.log, after.log):
        if training: assert not torch.equal(x0, x1) and loss_func == mix.lf  # blended, and the mixing loss
        else: assert torch.equal(x0, x1) and loss_func is lf                # validation untouched
    assert learn.loss_func is lf
    if layout == 'cl_bf16': assert all(is_cl(x1) for x1, _, _ in after.log)


def case_cutmix(layout, tmp_path):
    before, after = _mix_probes()
    learn = make(layout, cbs=[CutMix(1.), before, after], loss_func=CrossEntropyLossFlat(), metrics=[])
    learn.fit(2)
    partial = 0
    for x0, (x1, training, _) in zip(before.log, after.log):
        changed = (x0 != x1).any(dim=1)                          # (bs, H, W): where a patch was pasted
        if not training: assert not changed.any(); continue
        rows, cols = changed.any(dim=(0, 2)), changed.any(dim=(0, 1))
        # the pasted pixels form one rectangle, the same in every image of the batch
        assert torch.equal(changed.any(0), rows[:, None] & cols[None, :]) or not changed.any()
        partial += bool(changed.any()) and not bool(changed.all())
    assert partial >= 1


def case_csv_logger(layout, tmp_path):
    learn = make(layout, cbs=CSVLogger(fname='history.csv'), tmp_path=tmp_path)
    learn.fit(2)
    with open(tmp_path / 'history.csv') as f: rows = list(csv.reader(f))
    assert rows[0] == learn.recorder.metric_names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert [int(r[0]) for r in rows[1:]] == [0, 1]
    assert [float(v) for r in rows[1:] for v in r[1:-1]] == pytest.approx([v for row in learn.recorder.values for v in row])
    assert learn.logger == learn._log_row                      # the old logger is back


def case_terminate_on_nan(layout, tmp_path):
    def nan_at_2(learn):
        if learn.training and learn.iter == 2: learn.loss = torch.tensor(float('nan'))
    learn = make(layout, cbs=[TerminateOnNaNCallback(), Probe(order=-20, after_loss=nan_at_2)])
    learn.fit(3)
    assert learn.train_iter == 3 and learn.recorder.values == []   # stopped at the 3rd batch of the first epoch


def case_short_epoch(layout, tmp_path):
    "fastai's CancelTrainException (a fastai class) must end the training phase of our loop, not the fit"
    learn = make(layout, cbs=ShortEpochCallback(pct=0.5, short_valid=True))
    learn.fit(2)
    assert learn.train_iter == 2 * 3                                  # 3 of 4 batches trained, each epoch
    assert len(learn.recorder.batch_losses) == 2 * 2  # the 3rd cancels before the Recorder's after_batch (as in fastai)
    assert len(learn.recorder.values) == 2 and not any(math.isnan(v) for row in learn.recorder.values for v in row)


def case_collect_data(layout, tmp_path):
    learn = make(layout, cbs=(collect := CollectDataCallback()))
    learn.fit(1)
    assert len(collect.data) == N_TRAIN // BS + N_VALID // BS
    (xb, yb, pred, loss) = collect.data[0]
    assert xb[0].shape == (BS, 3, 8, 8) and yb[0].shape == (BS,) and pred.dtype == torch.float32
    assert not pred.requires_grad and pred.device.type == 'cpu' and loss.dim() == 0
    assert is_cl(xb[0]) == (layout == 'cl_bf16')


CASES = {name[5:]: f for name, f in list(globals().items()) if name.startswith('case_')}


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('case', list(CASES))
def test_fastai_callback(case, layout, tmp_path):
    CASES[case](layout, tmp_path)


# ---------------------------------------------------------------- optimizers, names, errors

@pytest.mark.parametrize('layout', LAYOUTS)
def test_fastai_adam_as_opt_func(layout):
    learn = make(layout, opt_func=FastaiAdam)
    learn.fit_one_cycle(2, lr_max=2e-2)
    lrs = learn.recorder.lrs
    assert max(lrs) == pytest.approx(2e-2, rel=1e-3) and lrs[0] == pytest.approx(2e-2 / 25)
    assert learn.opt.hypers[0]['mom'] != 0.9                   # the schedule moved the momentum too
    conv_w = learn.model[0].weight
    assert is_cl(learn.opt.state[conv_w]['grad_avg']) == (layout == 'cl_bf16')
    learn.fit(1, lr=3e-3)
    assert learn.opt.hypers[0]['lr'] == 3e-3


def test_fastai_optimizer_gets_wd_by_its_own_keyword():
    learn = make('plain', opt_func=FastaiAdam, wd=0.05)
    learn.create_opt()
    assert learn.opt.hypers[0]['wd'] == 0.05 and type(learn.opt).__name__ == 'Optimizer'  # fastai's, not wrapped


def test_fastai_adam_state_saves_loads_and_lr_find_restores_it(tmp_path):
    learn = make('plain', opt_func=FastaiAdam, tmp_path=tmp_path)
    learn.fit(1)
    w, st = weights(learn), {k: v.clone() for k, v in learn.opt.state[learn.model[0].weight].items() if torch.is_tensor(v)}
    res = FastaiLearner.lr_find(learn, num_it=8, show_plot=False)   # saves and loads model and optimizer state
    assert res.valley > 0 and same_weights(weights(learn), w)
    st2 = learn.opt.state[learn.model[0].weight]
    assert all(torch.equal(st2[k], v) for k, v in st.items()) and 'grad_avg' in st


def test_torch_optimizer_in_fastai_optimwrapper():
    "fastai's OptimWrapper rebuilds `param_groups` on each read: fit(lr=) and fit_one_cycle must go through set_hyper"
    learn = make('plain', opt_func=lambda params, lr: OptimWrapper(params, torch.optim.SGD, lr=lr, momentum=0.9))
    learn.fit(1, lr=0.05)
    assert learn.opt.opt.param_groups[0]['lr'] == 0.05
    learn.fit_one_cycle(1, lr_max=0.02)
    assert learn.recorder.lrs[0] == pytest.approx(0.02 / 25) and learn.opt.opt.param_groups[0]['momentum'] != 0.9


def test_fastai_callback_keeps_its_protocol():
    class Marker(FastaiCallback):
        order, run_valid = 7, False  # after nothing in particular: checks where it lands
        def before_fit(self): self.seen = []
        def before_batch(self): self.seen.append(self.learn.training)
    learn = make('plain', cbs=(m := Marker()))
    assert learn.marker is m and m.learn is learn
    learn.fit(1)
    assert m.seen == [True] * (N_TRAIN // BS)                  # run_valid=False honoured
    learn.remove_cb(Marker)
    assert m.learn is None and not any(isinstance(c, Marker) for c in learn.cbs)


def test_key_error_in_a_fastai_callback_keeps_the_key():
    class Broken(FastaiCallback):
        def after_epoch(self): return {}['no_such_column']
    learn = make('plain', cbs=Broken())
    with pytest.raises(KeyError, match="in callback `Broken` at event `after_epoch`") as e:
        learn.fit(1)
    assert 'no_such_column' in str(e.value)


def test_our_key_error_keeps_its_argument():
    def bad(self): return {}['valid_loss']
    learn = make('plain', cbs=Callback(after_epoch=bad))
    with pytest.raises(KeyError) as e: learn.fit(1)
    assert e.value.args == ('valid_loss',) and str(e.value) == "'valid_loss'"
    assert e.value.__notes__ == ["in callback `Callback` at event `after_epoch`"]
