import torch
import torch.nn.functional as F

from channelslast_cb.learner import DataLoaders, Learner, accuracy
from helpers import synth_images, tiny_cnn


def test_fit_lowers_loss_and_records_floats():
    dls = DataLoaders.from_tensors(synth_images(128), valid=synth_images(64, seed=1), bs=16)
    learn = Learner(dls, tiny_cnn(), loss_func=F.cross_entropy, metrics=accuracy, lr=1e-2, progress=False)
    learn.fit(3)
    rec = learn.recorder
    assert rec.column('epoch') == [0, 1, 2] and len(rec.values) == 3
    assert rec.column('train_loss')[-1] < rec.column('train_loss')[0]
    assert all(type(l) is float for l in rec.losses + rec.batch_losses)
    assert len(rec.losses) == len(rec.batch_losses) == 3 * 8 and rec.iters == [8, 16, 24]


from functools import partial

import pytest
from torch import nn

from channelslast_cb.core import Callback
from channelslast_cb.learner import Recorder, TrainEvalCallback, error_rate


def small_learner(**kw):
    dls = DataLoaders.from_tensors(synth_images(32), valid=synth_images(16, seed=1), bs=8)
    return Learner(dls, tiny_cnn(), **{'loss_func': F.cross_entropy, 'progress': False, **kw})


def test_opt_func_called_with_lr_and_wd_only_when_given():
    calls = []
    def rec(params, **kw):
        calls.append(kw)
        return torch.optim.SGD(params, **kw)
    small_learner(opt_func=rec, lr=0.1).fit(1)
    small_learner(opt_func=rec, lr=0.1, wd=0.01).fit(1)
    assert calls == [{'lr': 0.1}, {'lr': 0.1, 'weight_decay': 0.01}]


@pytest.mark.parametrize("opt_func", [torch.optim.SGD, partial(torch.optim.AdamW, betas=(0.8, 0.99)), torch.optim.Adam])
def test_plain_torch_optimizers_work(opt_func):
    learn = small_learner(opt_func=opt_func, lr=0.05)
    learn.fit(1)
    assert isinstance(learn.opt.opt, torch.optim.Optimizer) and learn.opt.param_groups is learn.opt.opt.param_groups
    if isinstance(opt_func, partial): assert learn.opt.param_groups[0]['betas'] == (0.8, 0.99)


def test_fit_lr_and_wd_set_every_param_group():
    learn = small_learner()
    learn.fit(1, lr=0.02, wd=0.3)
    assert {g['lr'] for g in learn.opt.param_groups} == {0.02}
    assert {g['weight_decay'] for g in learn.opt.param_groups} == {0.3}


def test_add_and_remove_callbacks_by_instance_and_class():
    class MyProbeCallback(Callback):
        def before_fit(self): self.learn.flag = True
    learn = small_learner()
    assert learn.add_cb(MyProbeCallback) is learn
    assert isinstance(learn.my_probe, MyProbeCallback) and learn.my_probe.learn is learn
    learn.fit(1)
    assert learn.flag
    assert learn.remove_cb(MyProbeCallback) is learn
    assert not hasattr(learn, 'my_probe') and not any(isinstance(c, MyProbeCallback) for c in learn.cbs)
    cb = MyProbeCallback()
    with learn.added_cbs(cb):
        assert cb in learn.cbs
    assert cb not in learn.cbs and cb.learn is None
    with learn.removed_cbs(learn.recorder):
        assert not any(isinstance(c, Recorder) for c in learn.cbs)
    assert isinstance(learn.recorder, Recorder)


def test_callbacks_run_in_order_and_only_handlers_are_dispatched():
    seen = []
    class A(Callback):
        order = 20
        def before_fit(self): seen.append('A')
    class B(Callback):
        order = -20
        def before_fit(self): seen.append('B')
    learn = small_learner(cbs=[A(), B()])
    learn.fit(1)
    assert seen == ['B', 'A']
    # only callbacks that define an event are in its dispatch table
    assert [type(cb) for cb, _ in learn._tables[True]['before_fit']] == [B, TrainEvalCallback, A, Recorder]
    assert learn._tables[True]['after_cancel_fit'] == ()


def test_callback_name_may_not_hide_a_learner_attribute():
    class Model(Callback): pass
    with pytest.raises(ValueError, match="would hide the learner's own attribute `model`"):
        small_learner(cbs=Model())


def test_validate_get_preds_and_metrics():
    learn = small_learner(metrics=[accuracy, error_rate])
    learn.fit(2)
    vl, acc, err = learn.validate()
    assert abs(acc + err - 1) < 1e-6
    preds, targs = learn.get_preds()
    assert preds.shape == (16, 2) and preds.dtype == torch.float32 and preds.is_contiguous()
    assert abs(F.cross_entropy(preds, targs).item() - vl) < 1e-5
    assert len(learn.recorder.values) == 2  # validate/get_preds kept the fit history


def test_get_preds_with_loss_needs_reduction():
    learn = small_learner(loss_func=lambda p, y: F.cross_entropy(p, y))
    with pytest.raises(TypeError, match="with_loss=True needs a loss_func with a `reduction`"):
        learn.get_preds(with_loss=True)
    learn = small_learner(loss_func=nn.CrossEntropyLoss())
    _, _, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (16,) and learn.loss_func.reduction == 'mean'


def test_save_load_roundtrip_real_file(tmp_path):
    learn = small_learner(path=tmp_path)
    learn.fit(1)
    p = learn.save('ckpt')
    assert p == tmp_path / 'models' / 'ckpt.pth' and p.exists()
    other = small_learner(path=tmp_path).load('ckpt')
    for a, b in zip(learn.model.state_dict().values(), other.model.state_dict().values()): assert torch.equal(a, b)
    sa, sb = learn.opt.state_dict()['state'], other.opt.state_dict()['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]['exp_avg'], sb[k]['exp_avg']) for k in sa)
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        other.load('missing')


def test_removed_cbs_by_class_restores_the_same_instances():
    learn = small_learner()
    rec = learn.recorder
    rec.batch_losses.append(1.5)
    with learn.removed_cbs(Recorder):
        assert not any(isinstance(c, Recorder) for c in learn.cbs)
    assert learn.recorder is rec and rec.batch_losses[-1] == 1.5
