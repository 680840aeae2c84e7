"""External client: this package's `ChannelsLast` used as a callback by a real fastai 2.8 `Learner`.

fastai's Learner calls `cb(event_name)` (our `Callback.__call__`), sets `cb.learn` and exposes the callback as
`learn.<cb.name>` in its own `add_cb`; nothing of our Learner is involved. Probes are fastai-side callbacks
(`fastai.callback.core.Callback`) with a higher `order`, so they see what our callback left behind.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from channelslast_cb.channelslast import ChannelsLast
from helpers import tiny_cnn

fastai = pytest.importorskip('fastai', reason="fastai is not installed: the external-client test needs fastai 2.8")
from fastai.callback.core import Callback as FastaiCallback  # noqa: E402
from fastai.data.core import DataLoaders as FastaiDataLoaders  # noqa: E402
from fastai.learner import Learner as FastaiLearner  # noqa: E402
from fastai.optimizer import OptimWrapper  # noqa: E402

CL = torch.channels_last


def is_cl(t): return t.is_contiguous(memory_format=CL)


class LayoutProbe(FastaiCallback):
    "Records, at `after_pred`, the layout of `xb[0]`, the conv weights' layouts, and the targets, in training and validation"
    order = 50  # after every default fastai callback and after ChannelsLast (-1)

    def __init__(self):
        super().__init__()
        self.seen, self.targets = [], []

    def after_pred(self):
        x, y = self.learn.xb[0], self.learn.yb[0]
        convs = [p for p in self.learn.model.parameters() if p.dim() == 4]
        self.seen.append((self.learn.training, tuple(x.shape), is_cl(x), all(map(is_cl, convs))))
        self.targets.append(y)


def images(n, seed):
    "Two classes of 3 x 8 x 8 noise images, told apart by a brightness offset: a tiny CNN learns them in a few steps"
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 3, 8, 8, generator=g) + (2. * y - 1.).view(-1, 1, 1, 1) * 0.5, y


def make_dls(bs=16):
    xt, yt = images(96, seed=0)
    xv, yv = images(32, seed=1)
    train = DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    valid = DataLoader(TensorDataset(xv, yv), batch_size=bs)
    return FastaiDataLoaders(train, valid, device='cpu'), (xv, yv)


SGD = partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9))  # a plain torch optimizer, fastai-wrapped


def make_learner(cbs, opt_func=SGD, model=None):
    dls, valid = make_dls()
    learn = FastaiLearner(dls, model if model is not None else tiny_cnn(), loss_func=F.cross_entropy,
                          opt_func=opt_func, cbs=cbs)
    return learn, valid


def test_fastai_learner_trains_with_our_channels_last_and_keeps_the_layout():
    cl, probe = ChannelsLast(), LayoutProbe()
    learn, (xv, yv) = make_learner([cl, probe])
    # fastai's add_cb attached it the fastai way
    assert cl.learn is learn and learn.channels_last is cl and cl in learn.cbs
    w0 = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    with learn.no_logging():
        loss0 = learn.validate()[0]
        probe.seen.clear(); probe.targets.clear()
        learn.fit(4, lr=0.05)
        loss1 = learn.validate()[0]

    # it trained: weights moved and the validation loss went down
    assert any(not torch.equal(w0[k], v) for k, v in learn.model.state_dict().items())
    assert loss1 < loss0 / 2, (loss0, loss1)
    # every batch fastai ran, training and validation, reached the model channels-last, with channels-last weights
    train_seen = [s for s in probe.seen if s[0]]
    valid_seen = [s for s in probe.seen if not s[0]]
    assert len(train_seen) == 4 * 6 and len(valid_seen) == 4 * 2 + 2
    assert all(shape == (16, 3, 8, 8) and x_cl and w_cl for _, shape, x_cl, w_cl in probe.seen), probe.seen[:5]
    # targets untouched: integer class labels, as the DataLoader made them
    assert all(y.dtype == torch.long and y.dim() == 1 for y in probe.targets)
    torch.testing.assert_close(torch.cat(probe.targets[-2:]), yv, rtol=0, atol=0)
    # the model stays channels-last after fit: every 4-D weight
    convs = {k: p for k, p in learn.model.named_parameters() if p.dim() == 4}
    assert convs and all(is_cl(p) for p in convs.values()), {k: p.stride() for k, p in convs.items()}
    # fastai's get_preds runs through it too, and its predictions are the model's on the validation set
    preds, targs = learn.get_preds(dl=learn.dls.valid)  # a plain DataLoader has no `.new` for fastai's default
    assert preds.shape == (32, 2) and torch.equal(targs, yv)
    learn.model.eval()
    with torch.no_grad(): direct = learn.model(xv.contiguous(memory_format=CL))
    torch.testing.assert_close(preds, direct, rtol=1e-5, atol=1e-6)  # F.cross_entropy: no activation


def test_fastai_training_with_our_channels_last_matches_fastai_without_it():
    "Same seeds, same batches: the channels-last fastai run ends with the weights of the contiguous one (fp32 rounding)"
    def run(cbs):
        torch.manual_seed(0)
        learn, _ = make_learner(cbs)
        with learn.no_logging(): learn.fit(2, lr=0.05)
        return learn.model.state_dict(), learn.recorder.values
    w_cl, rec_cl = run([ChannelsLast()])
    w_c, rec_c = run([])
    assert w_cl.keys() == w_c.keys()
    assert is_cl(w_cl['0.weight']) and not is_cl(w_c['0.weight'])
    for k in w_c:
        torch.testing.assert_close(w_cl[k], w_c[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(torch.tensor(rec_cl), torch.tensor(rec_c), rtol=1e-4, atol=1e-5)


def test_removed_from_a_fastai_learner_the_fastai_way():
    cl = ChannelsLast()
    learn, _ = make_learner([cl])
    learn.remove_cb(cl)
    assert cl.learn is None and cl not in learn.cbs and not hasattr(learn, 'channels_last')


def test_fastai_optimizer_state_follows_the_weights():
    "fastai's own Adam keeps its moments in `opt.state`: a contiguous fit then ChannelsLast converts them with the weights"
    from fastai.optimizer import Adam
    learn, _ = make_learner([], opt_func=Adam)
    with learn.no_logging(): learn.fit(1, lr=1e-2)  # moments created contiguous
    w = learn.model[0].weight
    assert not is_cl(w) and not is_cl(learn.opt.state[w]['grad_avg'])
    learn.add_cb(ChannelsLast())
    with learn.no_logging(): learn.fit(1, lr=1e-2)
    st = learn.opt.state[w]
    assert is_cl(w) and is_cl(st['grad_avg']) and is_cl(st['sqr_avg'])


def test_match_opt_state_layout_reaches_into_fastai_optimwrapper():
    "fastai's OptimWrapper keeps the torch optimizer in `.opt`: its Adam moments must follow the weights' layout."
    from fastai.optimizer import OptimWrapper
    from channelslast_cb.channelslast import match_opt_state_layout, to_channels_last
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = OptimWrapper(conv.parameters(), opt=torch.optim.Adam)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    to_channels_last(conv)
    match_opt_state_layout(opt)
    st = opt.opt.state[conv.weight]
    assert st['exp_avg'].is_contiguous(memory_format=torch.channels_last)
    assert st['exp_avg_sq'].is_contiguous(memory_format=torch.channels_last)
