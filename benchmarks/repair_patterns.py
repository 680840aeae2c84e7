"""Cost of each break `repair_layout` fixes, and of its repair, measured on the pattern alone (forward + backward).

    python benchmarks/repair_patterns.py

Each pattern runs between two 3x3 convolutions (the next layer is where a format break costs), in three variants:
NCHW (the original module, contiguous model and input), channels-last with the original module, and
channels-last with the repaired module. Interleaved rounds; the median step time per variant, and the median of
the paired ratios against NCHW. One thread.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

from channelslast_cb.all import repair_layout, to_channels_last


def _sandwich(mid: nn.Module, c: int, dims: int = 2) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(c, c, 3, padding=1), mid, conv(c, c, 3, padding=1))


def _aspp(c):
    from torchvision.models.segmentation.deeplabv3 import ASPP
    return ASPP(c, (12, 24, 36), c)


def _self_attention(c):
    from fastai.layers import SelfAttention
    sa = SelfAttention(c)
    nn.init.constant_(sa.gamma, 0.5)
    return sa


# name -> (model, input shape)
PATTERNS = {
    'InstanceNorm2d (2x32x64x64)': (lambda: _sandwich(nn.InstanceNorm2d(32, affine=True), 32), (2, 32, 64, 64)),
    'InstanceNorm3d (2x16x32^3)': (lambda: _sandwich(nn.InstanceNorm3d(16, affine=True), 16, 3), (2, 16, 32, 32, 32)),
    'ASPP with pooling branch (2x64x32x32)': (lambda: nn.Sequential(_aspp(64), nn.Conv2d(64, 64, 3, padding=1)),
                                              (2, 64, 32, 32)),
    'fastai SelfAttention (2x64x32x32)': (lambda: _sandwich(_self_attention(64), 64), (2, 64, 32, 32)),
}


def bench(name, rounds=9, steps=3, precision='fp32'):
    build, shape = PATTERNS[name]
    torch.manual_seed(0)
    base = build().train()
    x = torch.randn(*shape)
    variants = {'nchw': (copy.deepcopy(base), x), 'cl': (to_channels_last(copy.deepcopy(base)), to_channels_last(x))}
    fixed = copy.deepcopy(base)
    repair_layout(fixed)
    variants['cl_repaired'] = (to_channels_last(fixed), to_channels_last(x))
    ac = torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16')

    def run(m, xx):
        m.zero_grad(set_to_none=True)
        with ac: out = m(xx)
        out.float().square().mean().backward()

    for m, xx in variants.values(): run(m, xx)
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds):
        for k in keys[r % 3:] + keys[:r % 3]:
            t0 = time.perf_counter()
            for _ in range(steps): run(*variants[k])
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    vs = {k: statistics.median(a / b for a, b in zip(times['nchw'], v)) for k, v in times.items()}
    return med, vs


def main():
    torch.set_num_threads(1)
    print('| pattern | precision | NCHW ms | channels-last ms | repaired ms | channels-last vs NCHW | repaired vs NCHW | repaired vs channels-last |')
    print('|---|---|---:|---:|---:|---:|---:|---:|')
    for name in PATTERNS:
        for prec in ('fp32', 'bf16'):
            med, vs = bench(name, precision=prec)
            print(f"| {name} | {prec} | {med['nchw']:.1f} | {med['cl']:.1f} | {med['cl_repaired']:.1f} | "
                  f"{vs['cl']:.2f}x | {vs['cl_repaired']:.2f}x | {vs['cl_repaired'] / vs['cl']:.2f}x |", flush=True)


if __name__ == '__main__': sys.exit(main())
