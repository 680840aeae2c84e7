"""The model zoo: one training step through a real `Learner` with `ChannelsLast()` equals the contiguous step (outputs,
loss, every gradient, the weights and BatchNorm statistics after one SGD step) within fp32 tolerance, and the network's
activations, its last feature map, its weights and their gradients are channels-last.

Models: torchvision resnet18 and timm resnet50, efficientnet_b0, convnext_nano, mobilenetv3_large_100, regnety_008,
random init, batch 2 x 3 x 64 x 64 (the last feature map is then 2 x 2: large enough that channels-last and contiguous
strides differ, so the layout assertions mean something).

The tolerance, and why. Channels-last runs other kernels (oneDNN NHWC convolutions, ATen's channels-last BatchNorm,
which sums its batch statistics in another order), so its float32 results differ from the contiguous ones by rounding,
and that rounding grows through ~50-300 layers forward and back. Some values are pure rounding noise: a BatchNorm bias
that feeds a 1x1 convolution and then a training-mode BatchNorm has an exact gradient of zero, the batch mean of a
channel right after such a BatchNorm is exactly zero; any relative tolerance on those fails. So the yardstick is
measured, not guessed: the same step in float64 (contiguous) gives the exact answer, and for every compared tensor `t`
of a family `f` (logits, loss, gradients, weights after the step, BatchNorm running means, running variances)

    max|t_channels_last - t_contiguous|  <=  FACTOR * max|t_contiguous - t_float64|  +  FLOOR * max_f |float64|

The first term: channels-last differs from the contiguous fp32 step by at most a few times the contiguous step's own
rounding error (if both were equally accurate the left side would be at most 2x that error; FACTOR = 8 leaves room for
a reduction order that is less lucky). The second: the rounding of one fp32 reduction over ~10^3-10^4 terms of the
family's size (sqrt(n) * 6e-8 ~ 1e-6 .. 1e-5), for values that cancel to ~0 and for the channels-last BatchNorm
statistics, which are ~20x less accurate than the contiguous ones here (measured: up to 6e-7 of the family's size).
A real layout bug (a view with the wrong strides, a converted target, a missed tensor) gives errors of the size of the
values themselves, orders of magnitude above both terms. Measured on this machine: |cl - contiguous| stays below
4e-5 of the family's largest value for every tensor of every model.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.learner import DataLoaders, Learner

timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')

MODELS = ['resnet18', 'resnet50', 'efficientnet_b0', 'convnext_nano', 'mobilenetv3_large_100', 'regnety_008']
BS, SIZE, N_CLASSES, LR = 2, 64, 1000, 0.1
FACTOR, FLOOR = 8.0, 1e-5
CL = torch.channels_last
# Architectures that turn their activations channels-last on their own, even in a contiguous model (checked, see
# test_layout_is_channels_last_through_the_network): the only module whose output is still contiguous then.
TURNS_CL_BY_ITSELF = {'convnext_nano': 'stem.0'}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # On this shared 2-core machine other processes keep the load well above 2; with 2 OpenMP threads every barrier
    # then waits for a descheduled thread and a step gets 10-20x slower. One thread gives the same layouts and the
    # same comparison (all three runs of a model use the same thread count).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == 'resnet18': return torchvision.models.resnet18(weights=None)
    return timm.create_model(name, pretrained=False)


def num_features(name: str, model: nn.Module) -> int:
    return 512 if name == 'resnet18' else model.num_features


def is_cl(t: torch.Tensor) -> bool: return t.is_contiguous(memory_format=CL)


def unambiguous(t) -> bool:
    "A 4-D tensor whose channels-last and contiguous strides differ (more than one channel and one pixel)"
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1


class Probe(Callback):
    "Records what one training step computed, after every other callback (ChannelsLast, Recorder) has run"
    order = 100

    def __init__(self, model: nn.Module):
        super().__init__()
        self.last_map = None   # (module name, output) of the last 4-D module output of the forward pass
        self.not_cl = []       # (module name, class, shape) of 4-D module outputs that are not channels-last
        for n, m in model.named_modules(): m.register_forward_hook(self._hook(n))

    def _hook(self, name):
        def hook(m, i, o):
            if not unambiguous(o): return
            self.last_map = (name, o.detach())
            if not is_cl(o): self.not_cl.append((name or type(m).__name__, type(m).__name__, tuple(o.shape)))
        return hook

    def after_pred(self):
        self.xb_cl, self.xb_contig = is_cl(self.learn.xb[0]), self.learn.xb[0].is_contiguous()
        self.pred = self.learn.pred.detach().clone()

    def after_loss(self): self.loss = self.learn.loss.detach().clone()

    def after_backward(self):
        ps = dict(self.learn.model.named_parameters())
        self.grads = {n: p.grad.detach().clone() for n, p in ps.items()}
        self.grad_not_cl = [n for n, p in ps.items() if p.dim() == 4 and not is_cl(p.grad)]


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool) -> dict:
    "Train `model` (changed in place) for one SGD step on `(x, y)` through a `Learner`; return what the probe saw"
    probe = Probe(model)
    cbs = [probe] + ([ChannelsLast()] if channels_last else [])
    learn = Learner(DataLoaders([(x, y)]), model, loss_func=F.cross_entropy, opt_func=torch.optim.SGD, lr=LR,
                    cbs=cbs, progress=False)
    learn.recorder.print_table = False
    learn.fit(1)
    state = {f'after_step.{k}': v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    return dict(probe=probe, learn=learn, state=state,
                values={'pred': probe.pred, 'loss': probe.loss, **{f'grad.{k}': g for k, g in probe.grads.items()},
                        **state})


def family(key: str) -> str:
    "The group a compared tensor is scaled with: pred, loss, grad, weight, running_mean, running_var"
    if key in ('pred', 'loss'): return key
    if key.startswith('grad.'): return 'grad'
    last = key.rsplit('.', 1)[-1]
    return last if last in ('running_mean', 'running_var') else 'weight'


def max_abs(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    a = a.double()
    return (a if b is None else a - b.double()).abs().max().item()


@pytest.fixture(scope='module', params=MODELS)
def zoo(request):
    "Run the float64, float32 and channels-last float32 steps of one model; keep per-tensor error figures, not tensors"
    name = request.param
    base = make_model(name)
    drops = [n for n, m in base.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    # Dropout would draw its mask in memory order, which differs between layouts: the steps would not be comparable.
    assert not drops, f"{name} has active dropout in {drops}; build it with drop_rate=0"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BS, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, N_CLASSES, (BS,), generator=g)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    ref = one_step(copy.deepcopy(base).double(), x.double(), y, channels_last=False)['values']
    c32 = one_step(copy.deepcopy(base), x, y, channels_last=False)
    cl32 = one_step(copy.deepcopy(base), x, y, channels_last=True)
    assert c32['values'].keys() == cl32['values'].keys() == ref.keys()
    size = {}
    for k, v in ref.items(): size[family(k)] = max(size.get(family(k), 0.), max_abs(v))
    errors = {k: (max_abs(cl32['values'][k], c32['values'][k]),  # channels-last vs contiguous
                  max_abs(c32['values'][k], ref[k]),              # contiguous fp32's own rounding error
                  size[family(k)])                                 # the size of the family's values
              for k in ref}
    moved = max(max_abs(c32['state'][f'after_step.{k}'], before[k]) for k in before if before[k].is_floating_point())
    conv_weights = [n for n, p in cl32['learn'].model.named_parameters() if p.dim() == 4]
    res = dict(name=name, errors=errors, moved=moved, x_is_cl=is_cl(x), n_features=num_features(name, base),
               c32=c32['probe'], cl32=cl32['probe'], conv_weights=conv_weights,
               weights_not_cl=[n for n, p in cl32['learn'].model.named_parameters() if p.dim() == 4 and not is_cl(p)],
               c32_weights_cl=[n for n, p in c32['learn'].model.named_parameters() if unambiguous(p) and is_cl(p)])
    for run in (c32, cl32):  # keep the probes' layout records, drop their tensors and the learners
        run['learn'].remove_cb(run['probe'])
        run['probe'].grads = run['probe'].pred = None
    del c32, cl32, ref
    return res


def test_step_equals_contiguous_step_within_fp32_tolerance(zoo):
    errors = zoo['errors']
    assert zoo['moved'] > 1e-3, "the SGD step did not change the weights: the after-step comparison would be vacuous"
    assert {'pred', 'loss'} <= errors.keys() and sum(k.startswith('grad.') for k in errors) > 10
    bad = {k: (d, e, s) for k, (d, e, s) in errors.items() if not d <= FACTOR * e + FLOOR * s}
    worst = sorted(bad.items(), key=lambda kv: -kv[1][0] / (FACTOR * kv[1][1] + FLOOR * kv[1][2] + 1e-300))[:8]
    assert not bad, (f"{zoo['name']}: {len(bad)} of {len(errors)} tensors differ between the channels-last and the "
                     f"contiguous step by more than {FACTOR} x the contiguous fp32 rounding error + {FLOOR} x the size of "
                     f"their family. Worst (|cl - contiguous|, |contiguous - float64|, family size): {worst}")


def test_prediction_and_loss_close_in_plain_terms(zoo):
    "The same claim for the two quantities a user looks at, with a fixed tolerance anyone can read"
    (d_pred, _, s_pred), (d_loss, _, s_loss) = zoo['errors']['pred'], zoo['errors']['loss']
    assert d_pred <= 1e-4 * s_pred, f"{zoo['name']}: logits differ by {d_pred:.3g} (largest logit {s_pred:.3g})"
    assert d_loss <= 1e-5 * s_loss, f"{zoo['name']}: loss differs by {d_loss:.3g} (loss {s_loss:.4g})"


def test_layout_is_channels_last_through_the_network(zoo):
    name, cl, c = zoo['name'], zoo['cl32'], zoo['c32']
    # the inputs: the callback converted them (the batch was handed over contiguous)
    assert not zoo['x_is_cl'] and c.xb_contig and not c.xb_cl
    assert cl.xb_cl, f"{name}: xb[0] is not channels-last at after_pred"
    # the weights and their gradients
    assert zoo['conv_weights'] and not zoo['weights_not_cl'], f"{name}: 4-D weights not channels-last: {zoo['weights_not_cl']}"
    assert not cl.grad_not_cl, f"{name}: gradients of 4-D weights not channels-last: {cl.grad_not_cl}"
    # (1x1 kernels are both contiguous and channels-last: only the others can tell the two runs apart)
    assert not zoo['c32_weights_cl'], f"{name}: the contiguous run's weights were channels-last: {zoo['c32_weights_cl']}"
    # the network's last feature map (the last 4-D module output before global pooling)
    (mod, fmap), (mod_c, fmap_c) = cl.last_map, c.last_map
    assert mod == mod_c and fmap.shape == (BS, zoo['n_features'], SIZE // 32, SIZE // 32), (mod, fmap.shape)
    assert is_cl(fmap) and not fmap.is_contiguous(), f"{name}: the last feature map ({mod}) is not channels-last"
    if name in TURNS_CL_BY_ITSELF:
        # timm's LayerNorm2d permutes to NHWC, normalises and permutes back, which leaves NHWC strides: from the stem's
        # norm on, the "contiguous" ConvNeXt already runs channels-last (which is why channels-last barely changes its
        # speed, and why its two steps agree bitwise here). Only the stem convolution, fed the contiguous input, is not.
        assert is_cl(fmap_c), f"{name}: the contiguous run's last feature map ({mod_c}) is no longer channels-last"
        assert [n for n, _, _ in c.not_cl] == [TURNS_CL_BY_ITSELF[name]], c.not_cl[:10]
    else:
        assert fmap_c.is_contiguous() and not is_cl(fmap_c), f"{name}: the contiguous run's last feature map ({mod_c})"
    # Every architecture of this zoo keeps the format end to end: checked, not assumed (no 4-D module output with
    # more than one channel and one pixel leaves channels-last). Should a timm update add a layer that breaks it,
    # this lists the layer.
    assert not cl.not_cl, f"{name}: module outputs that are not channels-last: {cl.not_cl[:10]}"
