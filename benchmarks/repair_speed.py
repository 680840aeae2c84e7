"""Training speed of real segmentation models: contiguous vs channels-last vs channels-last after `repair_layout`.

    python benchmarks/repair_speed.py                       # all five models, fp32 and bf16 (~10 min on 2 loaded cores)
    python benchmarks/repair_speed.py monai2d --precision fp32 --rounds 3

Each model is built once (random weights, no download), copied three times: contiguous, channels-last, and
channels-last after `repair_layout`. One training step = forward, a per-pixel cross-entropy loss, backward, SGD step.
The variants run interleaved, `steps` steps each per round, the order rotating every round; the figure reported
is the median over rounds of the paired ratio (contiguous fp32 time / variant time), as `channelslast-bench` does.
The layout audit (`layout_report`, forward + backward) of each variant's copies is printed beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.all import layout_report, repair_layout, to_channels_last

warnings.filterwarnings('ignore', category=UserWarning)
VARIANTS = ('contiguous', 'channels_last', 'channels_last_repaired')


def _dynamic_unet(size):
    from fastai.vision.learner import create_body
    from fastai.vision.models.unet import DynamicUnet
    from torchvision.models import resnet34
    return DynamicUnet(create_body(resnet34(weights=None), pretrained=False), 3, (size, size), self_attention=True)


def _smp_unet(size):
    import segmentation_models_pytorch as smp
    return smp.Unet('resnet34', encoder_weights=None, classes=3)


def _monai(dims):
    def make(size):
        from monai.networks.nets import UNet
        return UNet(dims, 3 if dims == 2 else 1, 3, (16, 32, 64, 128), (2, 2, 2), norm='instance')
    return make


def _deeplab(size):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)


# name -> (builder(size), input shape for batch size bs and size px)
MODELS = {
    'dynamic_unet': (_dynamic_unet, lambda bs, px: (bs, 3, px, px)),
    'monai2d': (_monai(2), lambda bs, px: (bs, 3, px, px)),
    'monai3d': (_monai(3), lambda bs, px: (bs, 1, px // 2, px // 2, px // 2)),
    'deeplabv3_mbv3': (_deeplab, lambda bs, px: (bs, 3, px, px)),
    'smp_unet': (_smp_unet, lambda bs, px: (bs, 3, px, px)),
}


def _out(o): return o['out'] if isinstance(o, dict) else o


def run_model(name, bs, px, precisions, steps, rounds, warmup, log):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    base = build(px)
    x = torch.randn(*shape(bs, px))
    models, inputs, fixes = {}, {}, None
    for v in VARIANTS:
        m = copy.deepcopy(base) if name != 'dynamic_unet' else build(px)  # fastai's hooks refuse a deep copy
        if name == 'dynamic_unet': m.load_state_dict(base.state_dict())
        if v == 'channels_last_repaired': fixes = repair_layout(m)
        models[v] = to_channels_last(m) if v != 'contiguous' else m
        inputs[v] = to_channels_last(x) if v != 'contiguous' else x
    y = torch.randint(0, 3, (bs,) + tuple(shape(bs, px)[2:]))
    opts = {v: torch.optim.SGD(m.train().parameters(), lr=1e-4, momentum=0.9) for v, m in models.items()}
    copies = {v: layout_report(models[v], inputs[v], backward=True).n_copies for v in VARIANTS[1:]}

    def step(v, p):
        opts[v].zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16) if p == 'bf16' else nullcontext():
            out = _out(models[v](inputs[v]))
        F.cross_entropy(out.float(), y).backward()
        opts[v].step()

    keys = [(v, p) for p in precisions for v in VARIANTS]
    for k in keys:
        for _ in range(warmup): step(*k)
    times = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(steps): step(*k)
            times[k].append((time.perf_counter() - t0) / steps)
        log(f"{name} round {r + 1}/{rounds}: " + ', '.join(f"{v} {p} {times[v, p][-1] * 1e3:.0f} ms" for v, p in keys))
    ref = times['contiguous', 'fp32'] if 'fp32' in precisions else times['contiguous', precisions[0]]
    rows = []
    for v, p in keys:
        rows.append(dict(model=name, variant=v, precision=p, step_ms=statistics.median(times[v, p]) * 1e3,
                         speedup=statistics.median(a / b for a, b in zip(ref, times[v, p])),
                         vs_cl=statistics.median(a / b for a, b in zip(times['channels_last', p], times[v, p])),
                         vs_best=statistics.median(min(a, b) / c for a, b, c in
                                                   zip(times['contiguous', p], times['channels_last', p], times[v, p])),
                         copies=copies.get(v), repaired=len(fixes.repaired), round_ms=[t * 1e3 for t in times[v, p]]))
    return rows


def table(rows) -> str:
    head = '| model | precision | variant | layout copies / step | step ms | vs contiguous fp32 | vs best of contiguous, channels-last |'
    lines = [head, '|---|---|---|---:|---:|---:|---:|']
    for r in rows:
        copies = '-' if r['copies'] is None else str(r['copies'])
        best = f"{r['vs_best']:.2f}x" if r['variant'] == 'channels_last_repaired' else ''
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {copies} | {r['step_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {best} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='*', default=list(MODELS), metavar='MODEL', help=f"some of {', '.join(MODELS)} (default: all)")
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--img-size', type=int, default=64, help='height and width (3-D: a cube of half this side)')
    p.add_argument('--precision', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--json', type=Path)
    args = p.parse_args(argv)
    for m in args.models:
        if m not in MODELS: p.error(f"model {m!r} is not one of {', '.join(MODELS)}")
    torch.set_num_threads(1)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    rows = []
    for name in args.models:
        rows += run_model(name, args.batch_size, args.img_size, args.precision, args.steps, args.rounds, args.warmup, log)
    print(table(rows))
    if args.json:
        meta = dict(command='python benchmarks/repair_speed.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
                    date=datetime.now(timezone.utc).isoformat(timespec='seconds'), torch=torch.__version__,
                    python=platform.python_version(), threads=torch.get_num_threads(),
                    load=subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + '\n')


if __name__ == '__main__': main()
