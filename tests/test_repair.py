"""`repair_layout` and the audit on real third-party segmentation models (fastai, MONAI, torchvision, smp, timm).

Small inputs (32-64 px, batch 2), random weights, no download. Each repaired model must lose the copies the audit
counted, keep its `state_dict` keys, and compute the same outputs, gradients and training step as the original.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from channelslast_cb.all import (ChannelsLast, DataLoaders, Learner, layout_report, repair_layout, repair_plan,
                                 to_channels_last, to_contiguous_format)
from channelslast_cb.bench import REPAIRED, main

warnings.filterwarnings('ignore', category=UserWarning)  # timm/MONAI deprecation chatter
CL, CL3 = torch.channels_last, torch.channels_last_3d


def dynamic_unet():
    from fastai.vision.learner import create_body
    from fastai.vision.models.unet import DynamicUnet
    from torchvision.models import resnet34
    m = DynamicUnet(create_body(resnet34(weights=None), pretrained=False), 3, (64, 64), self_attention=True)
    for mod in m.modules():
        if type(mod).__name__ == 'SelfAttention': nn.init.constant_(mod.gamma, 0.5)  # starts at 0: make it count
    return m


def monai_unet(dims):
    from monai.networks.nets import UNet
    return UNet(dims, 2, 3, (8, 16, 32), (2, 2), norm='instance')


def deeplab():
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    m = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout): mod.p = 0.  # the same function in both copies, without a shared RNG stream
    return m


def smp_unet():
    import segmentation_models_pytorch as smp
    return smp.Unet('resnet34', encoder_weights=None, classes=3)


# name -> (builder, input shape, the modules repair_layout rewrites)
REPAIRABLE = {
    'monai2d': (lambda: monai_unet(2), (2, 2, 32, 32), {'model.0.adn.N', 'model.1.submodule.0.adn.N',
                                                         'model.1.submodule.1.submodule.adn.N', 'model.1.submodule.2.adn.N'}),
    'monai3d': (lambda: monai_unet(3), (2, 2, 16, 16, 16), {'model.0.adn.N', 'model.1.submodule.0.adn.N',
                                                             'model.1.submodule.1.submodule.adn.N', 'model.1.submodule.2.adn.N'}),
    'deeplabv3': (deeplab, (2, 3, 32, 32), {'classifier.0.convs.4'}),
    'dynamic_unet': (dynamic_unet, (2, 3, 64, 64), {'layers.5.conv2.2'}),  # at 32 px its bottleneck is 1x1: see the guide
}


def twins(build, n=2):
    "`n` copies of the model with the same weights, in training mode (fastai's DynamicUnet cannot be deep-copied)"
    torch.manual_seed(0)
    ms = [build() for _ in range(n)]
    for m in ms[1:]: m.load_state_dict(ms[0].state_dict())
    return [m.train() for m in ms]


def outputs(o) -> list[torch.Tensor]: return [t for t in tree_leaves(o) if isinstance(t, torch.Tensor)]


def step(model, x, ws, lr=0.1):
    "Forward, a fixed random projection of the outputs as the loss, backward, one SGD step: outputs, grads, weights"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    outs = outputs(model(x))
    sum((o.float() * w).mean() for o, w in zip(outs, ws)).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.step()
    return [o.detach() for o in outs], [grads], [torch.cat([p.detach().flatten() for p in model.parameters()])]


def err(a: list, b: list) -> float:
    "Largest difference between `a` and `b`, relative to the largest value of `b`"
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize('name', list(REPAIRABLE))
def test_repair_removes_the_copies_and_keeps_the_function(name):
    build, shape, expected = REPAIRABLE[name]
    ref, cl, fixed = twins(build, 3)
    x = torch.randn(*shape)
    state = {k: (v.clone(), v.stride()) for k, v in fixed.state_dict().items()}
    before = layout_report(fixed, x, backward=True)  # defaults: DynamicUnet too (it cannot be deep-copied)
    for k, v in fixed.state_dict().items():  # the audit left the model as it was (DynamicUnet: audited in place)
        assert torch.equal(v, state[k][0]) and v.stride() == state[k][1], k
    assert before.breaks and {r['path'] for r in before.repairable} == {r['path'] for r in before.breaks}
    keys = list(fixed.state_dict())
    fixes = repair_layout(fixed)
    assert {f.path for f in fixes.repaired} == expected and fixes.skipped == []
    assert list(fixed.state_dict()) == keys
    after = layout_report(fixed, x, backward=True)
    assert (after.breaks, after.n_copies) == ([], 0), after.table(breaks_only=True)
    assert before.n_copies > 0 or name == 'dynamic_unet'  # fastai's self-attention breaks through mixed ops, no copy
    assert after.n_mixed < before.n_mixed

    # NCHW (the model before to_channelslast, or after to_contiguous): the repaired modules compute the original
    torch.manual_seed(1)
    o_ref, o_fixed, _ = (outputs(m(x)) for m in (ref, fixed, cl))  # one forward each: spectral norm's state moves alike
    assert err(o_fixed, o_ref) < 1e-6
    ws = [torch.randn(o.shape) for o in o_ref]
    # channels-last: one training step of the original (NCHW), the unrepaired and the repaired model (channels-last).
    # The repaired one must not differ from the original by more than the layout's own rounding (the unrepaired one)
    xcl = to_channels_last(x)
    r_ref, r_cl, r_fixed = step(ref, x, ws), step(to_channels_last(cl), xcl, ws), step(to_channels_last(fixed), xcl, ws)
    for i, what in enumerate(('outputs', 'gradients', 'weights after the step')):
        assert err(r_fixed[i], r_ref[i]) <= max(2 * err(r_cl[i], r_ref[i]), 1e-5), what
    assert r_fixed[0][0].is_contiguous(memory_format=CL3 if len(shape) == 5 else CL)


def test_smp_unet_is_clean_and_left_as_it_was():
    torch.manual_seed(0)
    m = smp_unet().eval()
    before = {k: (v.clone(), v.stride()) for k, v in m.state_dict().items()}
    r = layout_report(m, torch.randn(2, 3, 64, 64), backward=True, train=True)  # 32 px: a 1x1 bottleneck, see the guide
    assert r.training and len(r.rows) > 100
    assert (r.breaks, r.n_copies, repair_plan(m)) == ([], 0, [])  # clean: nothing to repair
    assert not m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k


@pytest.mark.parametrize('make', ['timm_features', 'fpn_backbone'])
def test_audit_models_returning_lists_and_dicts(make):
    import timm
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    torch.manual_seed(0)
    m = {'timm_features': lambda: timm.create_model('resnet18', features_only=True, pretrained=False),
         'fpn_backbone': lambda: resnet_fpn_backbone(backbone_name='resnet18', weights=None, trainable_layers=5)}[make]()
    r = layout_report(m, torch.randn(2, 3, 32, 32), backward=True)
    assert (r.breaks, r.n_copies) == ([], 0)
    assert r.rows[0]['out_format'] == 'channels_last + both'  # every map of the list / dict: the 1x1 one is both


def test_repair_under_bf16_autocast_keeps_the_layout():
    ref, fixed = twins(lambda: monai_unet(2))
    repair_layout(fixed)
    r = layout_report(fixed, torch.randn(2, 2, 32, 32), backward=True, amp='bf16')
    assert (r.breaks, r.n_copies, r.amp) == ([], 0, 'bf16')
    x = torch.randn(2, 2, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a, b = ref(x), to_channels_last(fixed)(to_channels_last(x))
    assert a.dtype == b.dtype == torch.bfloat16 and b.is_contiguous(memory_format=CL)
    torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)


def test_channelslast_repair_fit_trains_like_contiguous():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 32, 32, generator=g), torch.randint(0, 3, (8, 32, 32), generator=g)
    ref, fixed = twins(lambda: monai_unet(2))
    learners = [Learner(DataLoaders.from_tensors((x, y), bs=4, shuffle=False), m, loss_func=F.cross_entropy,
                        opt_func=torch.optim.SGD, lr=0.05, cbs=cbs, progress=False)
                for m, cbs in ((ref, None), (fixed, ChannelsLast(repair=True)))]
    for learn in learners: learn.fit(1)
    cb = learners[1].channels_last
    assert {f.path for f in cb.fixes} == REPAIRABLE['monai2d'][2] and type(fixed.model[0].adn.N).__name__ == 'InstanceNorm2dCL'
    assert fixed.model[0].conv.weight.is_contiguous(memory_format=CL)
    for p1, p2 in zip(ref.parameters(), fixed.parameters()): torch.testing.assert_close(p2, p1, atol=1e-5, rtol=1e-4)
    assert layout_report(fixed, x[:2], backward=True).n_copies == 0
    learners[1].to_contiguous().fit(1)  # the repaired model trains in NCHW too
    assert not fixed.model[0].conv.weight.is_contiguous(memory_format=CL)


def test_bench_cli_repair_adds_the_repaired_layout(capsys):
    assert main(['test_resnet', '--img-size', '16', '--batch-size', '2', '--steps', '1', '--repeats', '1',
                 '--warmup', '0', '--precision', 'fp32', '--repair', '-q']) == 0
    out = capsys.readouterr().out
    assert [line.split()[3] for line in out.splitlines()[2:5]] == ['contiguous', 'channels_last', REPAIRED]


def test_auto_layout_choice_with_repair():
    "`ChannelsLast(auto=True, repair=True)`: the model is repaired, both layouts are timed, one is kept, training works"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 32, 32, generator=g), torch.randint(0, 3, (8, 32, 32), generator=g)
    (net,) = twins(lambda: monai_unet(2), 1)
    cb = ChannelsLast(auto=True, repair=True, warmup=0, block=1, rounds=1)
    learn = Learner(DataLoaders.from_tensors((x, y), bs=2, shuffle=False), net, loss_func=F.cross_entropy, cbs=cb,
                    progress=False)
    learn.fit(1)
    assert cb.decision is not None and cb.decision.layout in ('channels_last', 'contiguous')
    assert len(cb.fixes.repaired) == 4 and torch.isfinite(torch.tensor(learn.recorder.losses)).all()
