"Layout audit: breaks and copies are reported at exactly the right modules, and nothing the user owns changes."
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from channelslast_cb.audit import LayoutReport, layout_of, layout_report
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn

CL = torch.channels_last


def conv(ci, co): return nn.Conv2d(ci, co, 3, padding=1)


class CatNCHW(nn.Module):
    def forward(self, x): return torch.cat([x, torch.zeros(x.shape, dtype=x.dtype, device=x.device)], 1)


class Contiguous(nn.Module):
    def forward(self, x): return x.contiguous()


class ViewShuffle(nn.Module):
    "torchvision's channel_shuffle: view -> transpose -> contiguous -> view"
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ReshapeShuffle(nn.Module):
    "The same with reshape, whose copy is implicit"
    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def breaker():
    "Breaks the format five ways; a 3x3 conv after each break restores channels-last so each break stands alone"
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 8), nn.InstanceNorm2d(8), conv(8, 8), CatNCHW(), conv(16, 8), Contiguous(), conv(8, 8),
                         ViewShuffle(), conv(8, 8), ReshapeShuffle(), conv(8, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


BREAKS = {'1', '3', '5', '7', '9'}


@pytest.mark.parametrize('backward', [False, True])
def test_breaker_flags_exactly_the_breaking_modules(backward):
    r = layout_report(breaker(), torch.randn(2, 3, 8, 8), backward=backward)
    assert {row['path'] for row in r.breaks} == BREAKS
    rows = {row['path']: row for row in r.rows}
    for p in BREAKS:
        assert rows[p]['in_format'] == 'channels_last' and rows[p]['out_format'] == 'contiguous'
        assert rows[p]['copies'] == 1 and rows[p]['why'].startswith('channels_last -> contiguous')
    for p in ('2', '4', '6', '8', '10'):  # the 3x3 convs after each break restore the format, reading NCHW (mixed)
        assert rows[p]['in_format'] == 'contiguous' and rows[p]['out_format'] == 'channels_last'
        assert not rows[p]['breaks'] and rows[p]['mixed'] >= 1
    assert r.n_fwd_copies == 5
    if backward:  # InstanceNorm and both shuffles copy again in backward (their view backward); cat and .contiguous() do not
        assert {p: rows[p]['bwd_copies'] for p in BREAKS} == {'1': 1, '3': 0, '5': 0, '7': 1, '9': 1}
        assert r.n_copies == 8
    else: assert r.n_bwd_copies == 0 and r.n_copies == 5


class Block(nn.Module):
    "A parent with its own functional ops: a cat with an NCHW tensor in its forward, and a child that breaks"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv(8, 8), nn.InstanceNorm2d(8), nn.ReLU())
        self.conv = conv(16, 8)

    def forward(self, x):
        y = torch.cat([torch.ones(x.shape), x], 1)  # functional, in this module's own code
        return self.conv(y) + self.body(x)          # channels-last + NCHW: the add keeps channels-last


def test_functional_ops_and_containers_are_attributed_to_the_module_that_breaks():
    torch.manual_seed(0)
    r = layout_report(nn.Sequential(conv(3, 8), Block(), nn.InstanceNorm2d(8)), torch.randn(2, 3, 8, 8))
    rows = {row['path']: row for row in r.rows}
    # `1.body` returns the InstanceNorm's NCHW output (through a ReLU): the break is `1.body.1`'s, not its container's
    assert rows['1.body']['out_format'] == 'contiguous' and not rows['1.body']['breaks']
    # the block's own cat copies, but its output is channels-last again
    assert rows['1']['copies'] == 1 and rows['1']['out_format'] == 'channels_last'
    # the model's output is NCHW because of its last child, which is flagged; the model itself is not
    assert rows['']['out_format'] == 'contiguous' and not rows['']['breaks']
    assert {row['path'] for row in r.breaks} == {'1', '1.body.1', '2'}
    assert [(e['path'], e['op']) for e in r.events if e['kind'] == 'copy'] == [('1', 'cat'), ('1.body.1', 'clone'), ('2', 'clone')]


class Copies(nn.Module):
    "A known number of layout-changing copies: 5, and three copies that do not change the layout"
    def forward(self, x):
        a = x.contiguous()                      # 1: channels_last -> contiguous
        b = a.to(memory_format=CL)              # 2: contiguous -> channels_last
        c = b.contiguous().contiguous()         # 3 (the second call is a no-op)
        buf = torch.empty(x.shape)
        buf.copy_(b)                            # 4: copy_ from channels-last into an NCHW buffer
        d = torch.cat([a, b], 1)                # 5: cat of NCHW and channels-last
        e = b.to(torch.float64).clone()         # dtype cast and clone keep the layout: not counted
        f = torch.randn(2, 4, 1, 1).contiguous(memory_format=CL).contiguous()  # ambiguous shape: not counted
        return c, buf, d, e, f


def test_copy_counter_counts_exactly_the_layout_changing_copies():
    r = layout_report(Copies(), torch.randn(2, 4, 5, 5))
    assert r.n_copies == r.n_fwd_copies == 5
    assert [(e['op'], e['src'], e['dst']) for e in r.events if e['kind'] == 'copy'] == [
        ('clone', 'channels_last', 'contiguous'), ('_to_copy', 'contiguous', 'channels_last'),
        ('clone', 'channels_last', 'contiguous'), ('copy_', 'channels_last', 'contiguous'),
        ('cat', 'channels_last', 'contiguous')]  # cat writes NCHW: its channels-last operand is transposed
    assert r.rows[0]['path'] == '' and r.rows[0]['copies'] == 5 and r.rows[0]['breaks']


class TinyViT(nn.Module):
    "A patch-embedding conv, then multi-head attention on 4-D (batch, heads, tokens, dim) tensors"
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.embed, self.qkv, self.heads = nn.Conv2d(3, d, 2, stride=2), nn.Linear(d, 3 * d), heads

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)                      # (B, N, d)
        b, n, d = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v                   # (B, heads, N, d / heads)
        return a.transpose(1, 2).contiguous().reshape(b, n, d)           # a transposing copy, in either layout


def test_transposes_of_tensors_that_never_were_channels_last_are_not_counted():
    torch.manual_seed(0)
    r = layout_report(TinyViT(), torch.randn(2, 3, 8, 8), backward=True)
    assert r.breaks == [] and r.n_copies == 0 and r.events == []
    assert {row['path']: row['out_format'] for row in r.rows}['embed'] == 'channels_last'


def test_resnet18_is_clean():
    "torch 2.15, CPU: no break and no layout-changing copy, forward or backward; one mixed op in backward"
    r = layout_report(resnet18(), torch.randn(2, 3, 64, 64), backward=True, train=True)
    assert r.breaks == [] and r.n_fwd_copies == 0 and r.n_bwd_copies == 0
    rows = {row['path']: row for row in r.rows}
    assert all(rows[p]['out_format'] == 'channels_last' for p in ('conv1', 'bn1', 'maxpool', 'layer1', 'layer4'))
    assert rows['avgpool']['out_format'] == 'both' and rows['fc']['in_format'] == '-'
    # The global average pool's backward expands an N x C x 1 x 1 gradient into an NCHW tensor; the last ReLU's
    # backward reads it and writes channels-last again: a mixed-layout op, not a copy.
    assert [(e['path'], e['phase'], e['kind'], e['op'], e['src'], e['dst']) for e in r.events] == [
        ('layer4.1.relu', 'backward', 'mixed', 'threshold_backward', 'contiguous', 'channels_last')]
    r = layout_report(resnet18().eval(), torch.randn(2, 3, 64, 64))  # inference: clean too
    assert r.breaks == [] and r.n_copies == 0 and r.events == [] and not r.training


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x): return x * self.fc2(self.fc1(x.mean((2, 3), keepdim=True)).relu()).sigmoid()


def test_ambiguous_shapes_are_both_and_never_flagged():
    assert [layout_of(t) for t in (torch.randn(2, 1, 5, 5), torch.randn(2, 6, 1, 1), torch.randn(1, 1, 1, 1),
                                    torch.randn(2, 6, 1, 1).contiguous(memory_format=CL))] == ['both'] * 4
    torch.manual_seed(0)
    # grayscale input, a squeeze-excitation gate (N x C x 1 x 1), a conv back to C == 1, a 1x1 conv on a pooled map
    m = nn.Sequential(conv(1, 6), SE(6), conv(6, 1), nn.ReLU(), conv(1, 6), nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1),
                      nn.Flatten())
    r = layout_report(m, torch.randn(2, 1, 6, 6), backward=True)
    assert r.breaks == [] and r.n_copies == 0
    fmt = {row['path']: (row['in_format'], row['out_format']) for row in r.rows}
    assert fmt['0'] == ('both', 'channels_last') and fmt['1.fc1'] == ('both', 'both') and fmt['2'][1] == 'both'
    assert fmt['4'] == ('both', 'channels_last') and fmt['5'] == ('channels_last', 'both') and fmt['6'] == ('both', 'both')


def _snapshot(m):
    return ({k: (v.clone(), v.stride(), v.dtype) for k, v in m.state_dict().items()},
            [(id(p), None if p.grad is None else p.grad.clone()) for p in m.parameters()],
            [mod.training for mod in m.modules()])


def _assert_same(m, snap):
    state, grads, modes = _snapshot(m)
    assert state.keys() == snap[0].keys()
    for k, (v, stride, dtype) in state.items():
        assert stride == snap[0][k][1] and dtype == snap[0][k][2], k
        assert torch.equal(v, snap[0][k][0]), k
    assert [i for i, _ in grads] == [i for i, _ in snap[1]]
    for (_, g), (_, g0) in zip(grads, snap[1]):
        assert (g is None) == (g0 is None) and (g is None or torch.equal(g, g0))
    assert modes == snap[2]
    for mod in m.modules(): assert not mod._forward_hooks and not mod._forward_pre_hooks


@pytest.mark.parametrize('copy', [True, False])
def test_users_model_is_left_as_it_was(copy):
    torch.manual_seed(0)
    m = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), nn.InstanceNorm2d(8, affine=True), conv(8, 8),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    m.eval()
    m[0].weight.grad = torch.full_like(m[0].weight, 3.)  # a gradient the user already has
    snap = _snapshot(m)
    r = layout_report(m, torch.randn(4, 3, 8, 8), backward=True, train=True, copy=copy)
    assert r.training and {row['path'] for row in r.breaks} == {'3'}
    _assert_same(m, snap)
    assert not m.training and m[0].weight.is_contiguous() and not m[0].weight.is_contiguous(memory_format=CL)


def test_model_is_restored_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x): raise ValueError('boom')
    torch.manual_seed(0)
    m = nn.Sequential(conv(3, 4), nn.BatchNorm2d(4), Boom())
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match=r"inside module '2' \(Boom\) while running in channels-last: ValueError: boom"):
        layout_report(m, torch.randn(2, 3, 6, 6), copy=False)
    _assert_same(m, snap)


def test_bad_input_errors():
    class ViewHead(nn.Module):
        def forward(self, x): return x.view(x.shape[0], -1)
    with pytest.raises(RuntimeError, match=r"inside module '1' \(ViewHead\).*use `\.reshape`") as e:
        layout_report(nn.Sequential(conv(3, 4), ViewHead()), torch.randn(2, 3, 6, 6))
    assert 'instead. A `.view`' in str(e.value) and 'instead..' not in str(e.value)  # one period after torch's
    with pytest.raises(ValueError, match="amp_mode 'fp8' is not one of 'fp16', 'bf16', 'auto'"):
        layout_report(tiny_cnn(), torch.randn(2, 3, 6, 6), amp='fp8')
    frozen = tiny_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="needs a model output that requires grad"):
        layout_report(frozen, torch.randn(2, 3, 6, 6), backward=True)

    class NoCopy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv(3, 4)
            self.gen = (i for i in range(3))  # generators cannot be deep-copied
        def forward(self, x): return self.conv(x)
    with pytest.raises(TypeError, match="could not deep-copy the model .*Pass copy=None or copy=False"):
        layout_report(NoCopy(), torch.randn(2, 3, 6, 6), copy=True)  # a copy asked for, and none can be made
    assert layout_report(NoCopy(), torch.randn(2, 3, 6, 6)).breaks == []  # the default audits it in place
    assert layout_report(NoCopy(), torch.randn(2, 3, 6, 6), copy=False).breaks == []


def test_conv3d_model_is_audited_in_channels_last_3d():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.InstanceNorm3d(8),
                      nn.Conv3d(8, 8, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2))
    r = layout_report(m, torch.randn(2, 2, 4, 6, 6), backward=True)
    rows = {row['path']: row for row in r.rows}
    assert rows['']['in_format'] == 'channels_last_3d'
    assert [rows[p]['out_format'] for p in '01234'] == ['channels_last_3d'] * 3 + ['contiguous', 'channels_last_3d']
    assert {row['path'] for row in r.breaks} == {'3'}
    assert rows['3']['why'].startswith('channels_last_3d -> contiguous') and (rows['3']['copies'], rows['3']['bwd_copies']) == (1, 1)
    assert rows['5']['out_format'] == 'both'


def test_mixed_precision_forward_runs_in_bf16():
    seen = []
    class Probe(nn.Module):
        def forward(self, x): seen.append(x.dtype); return x
    torch.manual_seed(0)
    r = layout_report(nn.Sequential(conv(3, 4), Probe()), torch.randn(2, 3, 6, 6), amp='bf16', backward=True)
    assert seen == [torch.bfloat16] and r.amp == 'bf16' and r.breaks == [] and r.n_copies == 0


def _learner(**kw):
    dls = DataLoaders.from_tensors(synth_images(32, size=8), bs=8, shuffle=False)
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), nn.InstanceNorm2d(8), conv(8, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return Learner(dls, net, progress=False, **kw)


def test_learner_layout_report_on_a_real_batch():
    calls = []
    def loss_func(pred, y):
        calls.append((pred.dtype, y.tolist()))
        return F.cross_entropy(pred, y)
    learn = _learner(loss_func=loss_func)
    snap = _snapshot(learn.model)
    r = learn.layout_report(backward=True)
    assert isinstance(r, LayoutReport) and r.backward and r.training and r.amp is None
    assert {row['path'] for row in r.breaks} == {'3'} and (r.n_fwd_copies, r.n_bwd_copies) == (1, 1)
    assert calls == [(torch.float32, synth_images(32, size=8)[1][:8].tolist())]  # the learner's loss, on the first batch
    _assert_same(learn.model, snap)
    assert learn.xb == () and learn.yb == () and learn.opt is None
    assert '!! 3' in str(r) and 'InstanceNorm2d' in r._repr_markdown_()

    learn.to_bf16()
    calls.clear()
    r = learn.layout_report(backward=True)
    assert r.amp == 'bf16' and calls[0][0] == torch.float32  # predictions leave autocast as float32, as in training
    assert {row['path'] for row in r.breaks} == {'3'}
    learn.fit(1)  # the learner still trains normally afterwards
    assert len(learn.recorder.losses) == 4
    assert learn.remove_cb(MixedPrecision).layout_report().amp is None


def test_records_are_dataframe_ready():
    r = layout_report(breaker(), torch.randn(2, 3, 8, 8))
    recs = r.to_records()
    assert [rec['path'] for rec in recs][:3] == ['', '0', '1']
    keys = {'path', 'type', 'calls', 'in_format', 'out_format', 'breaks', 'why', 'copies', 'bwd_copies', 'mixed', 'repair',
            'repairable'}
    assert all(set(rec) == keys for rec in recs)
    assert all(isinstance(rec[k], str) for rec in recs for k in ('path', 'type', 'in_format', 'out_format', 'why', 'repair'))
    recs[0]['path'] = 'changed'
    assert r.rows[0]['path'] == ''
    assert len(r.table(breaks_only=True).splitlines()) < len(r.table().splitlines())


def test_learner_layout_report_after_to_channelslast_and_a_fit():
    learn = _learner(loss_func=F.cross_entropy).to_channelslast(amp_mode='bf16')
    learn.fit(1)  # ChannelsLast has made the learner's model channels-last for good
    w = learn.model[0].weight
    assert w.is_contiguous(memory_format=CL)
    snap = _snapshot(learn.model)
    r = learn.layout_report(backward=True)
    assert r.amp == 'bf16' and {row['path'] for row in r.breaks} == {'3'}
    _assert_same(learn.model, snap)
    assert learn.model[0].weight is w and learn.model[0].weight.is_contiguous(memory_format=CL)


def test_report_says_which_breaks_repair_layout_fixes():
    r = layout_report(breaker(), torch.randn(2, 3, 8, 8), backward=True)
    assert {row['path'] for row in r.breaks} == BREAKS
    assert [(row['path'], row['repair']) for row in r.repairable] == [('1', '1')]  # the InstanceNorm2d, and only it
    assert 'repair_layout(model) would fix 1 of the 5 flagged' in r.summary()
    assert '1 (InstanceNorm2d): channels_last -> contiguous' in str(r) and '[repair_layout fixes it: rewrites 1]' in str(r)
