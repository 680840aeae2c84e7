"""Faults and cancels: every Cancel*Exception skips exactly what fastai skips, any other error names the callback
and the event and leaves the learner usable, and bad input gets a clear error."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.core import (EVENTS, Callback, CancelBackwardException, CancelBatchException,
                                  CancelEpochException, CancelFitException, CancelStepException,
                                  CancelTrainException, CancelValidException)
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn


class Probe(Callback):
    "Record every event; raise `exc` the first time `at` fires in the given phase."
    def __init__(self, at=None, exc=None, phase=None):
        super().__init__()
        self.at, self.exc, self.phase, self.seen, self.fired = at, exc, phase, [], False

    def _on(self, e):
        self.seen.append(e)
        if e == self.at and not self.fired and (self.phase is None or self.learn.training == (self.phase == 'train')):
            self.fired = True
            raise self.exc


for _e in EVENTS: setattr(Probe, _e, (lambda e: lambda self: self._on(e))(_e))


def make_learner(cbs=None, model=None, n_train=4, n_valid=2):
    dls = DataLoaders.from_tensors(synth_images(n_train), valid=synth_images(n_valid, seed=1), bs=2, shuffle=False)
    return Learner(dls, model or tiny_cnn(), loss_func=F.cross_entropy, cbs=cbs, progress=False)


TB = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step', 'after_step', 'after_batch']
VB = ['before_batch', 'after_pred', 'after_loss', 'after_batch']
VALID = ['before_validate', *VB, 'after_validate']
TAIL = ['after_epoch', 'after_fit']


def fit_seq(train_batches, valid=VALID, tail=TAIL):
    return ['before_fit', 'before_epoch', 'before_train', *train_batches, 'after_train', *valid, *tail]


# (exception, event it is raised at, phase, expected event sequence of a 1-epoch fit with 2 train and 1 valid batch)
CASES = [
    (None, None, None, fit_seq(TB + TB)),
    (CancelBatchException, 'before_batch', 'train', fit_seq(['before_batch', 'after_cancel_batch', 'after_batch'] + TB)),
    (CancelBatchException, 'after_pred', 'train', fit_seq(['before_batch', 'after_pred', 'after_cancel_batch', 'after_batch'] + TB)),
    (CancelBatchException, 'after_loss', 'train', fit_seq(TB[:3] + ['after_cancel_batch', 'after_batch'] + TB)),
    (CancelBatchException, 'after_step', 'train', fit_seq(TB[:7] + ['after_cancel_batch', 'after_batch'] + TB)),
    (CancelBatchException, 'after_pred', 'valid',
     fit_seq(TB + TB, valid=['before_validate', 'before_batch', 'after_pred', 'after_cancel_batch', 'after_batch', 'after_validate'])),
    (CancelBackwardException, 'before_backward', 'train',
     fit_seq(TB[:4] + ['after_cancel_backward', 'after_backward', 'before_step', 'after_step', 'after_batch'] + TB)),
    (CancelStepException, 'before_step', 'train', fit_seq(TB[:6] + ['after_cancel_step', 'after_step', 'after_batch'] + TB)),
    (CancelTrainException, 'before_train', None,
     ['before_fit', 'before_epoch', 'before_train', 'after_cancel_train', 'after_train', *VALID, *TAIL]),
    (CancelTrainException, 'after_pred', 'train',
     ['before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_cancel_train', 'after_train', *VALID, *TAIL]),
    (CancelValidException, 'before_validate', None,
     fit_seq(TB + TB, valid=['before_validate', 'after_cancel_validate', 'after_validate'])),
    (CancelValidException, 'after_loss', 'valid',
     fit_seq(TB + TB, valid=['before_validate', 'before_batch', 'after_pred', 'after_loss', 'after_cancel_validate', 'after_validate'])),
    (CancelEpochException, 'before_epoch', None, ['before_fit', 'before_epoch', 'after_cancel_epoch', 'after_epoch', 'after_fit']),
    (CancelEpochException, 'after_train', None,
     ['before_fit', 'before_epoch', 'before_train', *TB, *TB, 'after_train', 'after_cancel_epoch', 'after_epoch', 'after_fit']),
    (CancelFitException, 'before_fit', None, ['before_fit', 'after_cancel_fit', 'after_fit']),
    (CancelFitException, 'after_batch', 'train',
     ['before_fit', 'before_epoch', 'before_train', *TB, 'after_cancel_fit', 'after_fit']),
    (CancelFitException, 'after_epoch', None, fit_seq(TB + TB, tail=['after_epoch', 'after_cancel_fit', 'after_fit'])),
]


@pytest.mark.parametrize("exc,at,phase,expected", CASES,
                         ids=[f"{c[0].__name__ if c[0] else 'none'}-{c[1]}-{c[2]}" for c in CASES])
def test_cancel_skips_exactly_what_fastai_skips(exc, at, phase, expected):
    probe = Probe(at, exc() if exc else None, phase)
    learn = make_learner(probe)
    learn.fit(1)
    assert probe.seen == ['after_create', *expected]
    assert not learn.training and not learn.model.training


def test_cancelled_step_leaves_weights_unchanged():
    learn = make_learner(Probe('before_step', CancelStepException(), 'train'), n_train=2)
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.create_opt()
    learn.fit(1)  # the only training batch has its step cancelled
    for a, b in zip(before, learn.model.parameters()): assert torch.equal(a, b)


@pytest.mark.parametrize("event", [e for e in EVENTS if e != 'after_create' and not e.startswith('after_cancel')])
def test_error_in_any_handler_names_callback_and_event_and_learner_recovers(event):
    probe = Probe(event, RuntimeError("boom"))
    learn = make_learner(probe)
    with pytest.raises(RuntimeError, match=rf"boom \[in callback `Probe` at event `{event}`\]"):
        learn.fit(1)
    # consistent state: eval mode, no batch tensors kept, no forward context left behind
    assert learn.training is False and learn.model.training is False
    assert learn.xb == () and learn.pred is None and learn.loss is None
    assert not torch.is_autocast_enabled('cpu')
    # and the learner trains again (the probe only raises once)
    learn.fit(1)
    assert len(learn.recorder.values) == 1


def test_error_in_after_cancel_event_is_named_too():
    class Both(Callback):
        def after_pred(self): raise CancelBatchException()
        def after_cancel_batch(self): raise ValueError("cleanup failed")
    learn = make_learner(Both())
    with pytest.raises(ValueError, match=r"cleanup failed \[in callback `Both` at event `after_cancel_batch`\]"):
        learn.fit(1)


class InterruptOnce(nn.Module):
    "A model whose forward raises KeyboardInterrupt on its `at`-th call."
    def __init__(self, at):
        super().__init__()
        self.net, self.calls, self.at = tiny_cnn(), 0, at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at: raise KeyboardInterrupt
        return self.net(x)


def test_keyboard_interrupt_during_batch_leaves_learner_able_to_fit():
    model = InterruptOnce(at=2)
    learn = make_learner(model=model)
    with pytest.raises(KeyboardInterrupt): learn.fit(1)
    assert learn.training is False and model.training is False and learn.xb == ()
    w = [p.detach().clone() for p in model.parameters()]
    learn.fit(2)
    assert len(learn.recorder.values) == 2
    assert any(not torch.equal(a, b) for a, b in zip(w, model.parameters()))


# ---------------------------------------------------------------- bad input

def test_unknown_event_keyword():
    with pytest.raises(TypeError, match="unknown keyword 'after_predict'.*Did you mean after_pred"):
        Callback(after_predict=lambda self: None)


@pytest.mark.parametrize("loss_func", [None, "cross_entropy", 3])
def test_non_callable_loss_func(loss_func):
    dls = DataLoaders.from_tensors(synth_images(4), bs=2)
    with pytest.raises(TypeError, match="loss_func must be callable"):
        Learner(dls, tiny_cnn(), loss_func=loss_func)


def test_empty_training_set():
    with pytest.raises(ValueError, match="training set is empty"):
        DataLoaders(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3)), batch_size=2))
    with pytest.raises(TypeError, match="one-shot iterator"): DataLoaders(iter(()))  # would be empty from epoch 2 on

    class NoBatches:  # an iterable without a len() that yields nothing: found only when it runs
        def __iter__(self): return iter(())
    learn = Learner(DataLoaders(NoBatches()), tiny_cnn(), loss_func=F.cross_entropy, progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        learn.fit(1)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_bad_epoch_counts(n):
    learn = make_learner()
    with pytest.raises(ValueError, match="n_epoch must be a positive integer"):
        learn.fit(n)
    with pytest.raises(ValueError, match="n_epoch must be a positive integer"):
        learn.fit_one_cycle(n)


def test_remove_cb_not_there_returns_self():
    learn = make_learner()
    n = len(learn.cbs)
    assert learn.remove_cb(Probe()) is learn
    assert learn.remove_cb(Probe) is learn
    assert len(learn.cbs) == n


def test_batch_not_x_y_shaped():
    learn = Learner(DataLoaders([torch.randn(2, 3, 8, 8)]), tiny_cnn(), loss_func=F.cross_entropy, progress=False)
    with pytest.raises(TypeError, match="must be a tuple or list \\(x, y\\).*n_inp"):
        learn.fit(1)
    learn = Learner(DataLoaders([(torch.randn(2, 3, 8, 8),)]), tiny_cnn(), loss_func=F.cross_entropy, progress=False)
    with pytest.raises(ValueError, match="has no target.*n_inp"):
        learn.fit(1)
    with pytest.raises(ValueError, match="n_inp must be an integer >= 1, got 0"):
        DataLoaders([(torch.randn(2, 3, 8, 8), torch.zeros(2))], n_inp=0)


def test_n_inp_splits_several_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__(); self.a, self.b = tiny_cnn(), tiny_cnn(seed=1)
        def forward(self, x1, x2): return self.a(x1) + self.b(x2)
    x, y = synth_images(4)
    learn = Learner(DataLoaders([(x, x.flip(0), y)], n_inp=2), Two(), loss_func=F.cross_entropy, progress=False)
    learn.fit(1)
    assert len(learn.recorder.losses) == 1
