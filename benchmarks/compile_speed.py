"""Eager vs `torch.compile` training steps on this CPU: contiguous vs channels-last, fp32 vs bf16 autocast.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/compile_speed.py --threads 2 --md benchmarks/results/compile.md

Per model, each variant (layout x precision x eager/compiled) gets its own copy of the same randomly initialised model
and its own SGD (momentum 0.9) optimizer, and trains on one fixed batch (`--bs` x 3 x `--size` x `--size`, random).
Compiled variants use `nn.Module.compile()` (inductor, default mode) on their copy, as `Learner.compile()` does; the
optimizer step stays eager. Compile time = the wall time of the first training step (forward and backward graphs are
compiled there) minus the variant's median step; it is measured once, before the timed rounds, one variant at a
time. Then the variants run round-robin (the starting variant rotating), `--warmup` untimed steps each first; one
timed repeat = `--steps` steps of one variant; the table reports the median over `--repeats` rounds, and speed-ups
are medians of per-round ratios to eager contiguous fp32 (paired within a round). `uptime` is recorded before and
after each model: the machine is shared.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ['resnet18', 'efficientnet_b0']
CL = torch.channels_last


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == 'resnet18':
        import torchvision
        return torchvision.models.resnet18(weights=None)
    import timm
    return timm.create_model(name, pretrained=False)


def uptime() -> str:
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


class Variant:
    def __init__(self, model: nn.Module, layout: str, precision: str, compiled: bool, x, y):
        self.layout, self.precision, self.compiled = layout, precision, compiled
        self.model = copy.deepcopy(model).train()
        if layout == 'channels_last': self.model = self.model.to(memory_format=CL)
        self.x = x.contiguous(memory_format=CL) if layout == 'channels_last' else x
        self.y = y
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        if compiled: self.model.compile()
        self.times, self.first_s = [], None

    @property
    def key(self): return f"{'compiled' if self.compiled else 'eager'} {self.layout} {self.precision}"

    def step(self):
        ctx = torch.autocast('cpu', dtype=torch.bfloat16) if self.precision == 'bf16' else nullcontext()
        with ctx: out = self.model(self.x)
        loss = F.cross_entropy(out.float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def bench_model(name, args, log):
    base = make_model(name)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.bs, 3, args.size, args.size, generator=g), torch.randint(0, 1000, (args.bs,), generator=g)
    variants = [Variant(base, l, p, c, x, y) for c in (False, True) for p in args.precisions
                for l in ('contiguous', 'channels_last')]
    load = [uptime()]
    for v in variants:  # the first step: compiles the compiled variants
        t0 = time.perf_counter(); v.step(); v.first_s = time.perf_counter() - t0
        log(f'{name} {v.key}: first step {v.first_s:.1f} s')
    for v in variants:
        for _ in range(args.warmup): v.step()
    for r in range(args.repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = time.perf_counter()
            for _ in range(args.steps): v.step()
            v.times.append((time.perf_counter() - t0) / args.steps)
        log(f'{name} round {r + 1}/{args.repeats}: ' + ', '.join(f'{v.key} {v.times[-1] * 1e3:.0f}' for v in variants))
    load.append(uptime())
    base_v = variants[0]
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        eager = next(e for e in variants if not e.compiled and (e.layout, e.precision) == (v.layout, v.precision))
        rows.append(dict(model=name, layout=v.layout, precision=v.precision, compiled=v.compiled, step_ms=med * 1e3,
                         speedup=statistics.median(b / t for b, t in zip(base_v.times, v.times)),
                         vs_eager=statistics.median(e / t for e, t in zip(eager.times, v.times)),
                         compile_s=(v.first_s - med) if v.compiled else None, first_step_s=v.first_s,
                         round_ms=[t * 1e3 for t in v.times]))
        if v.compiled:  # break-even: steps after which the compile time is paid back by faster steps
            saved = statistics.median(eager.times) - med
            rows[-1]['break_even_steps'] = rows[-1]['compile_s'] / saved if saved > 0 else None
    return rows, load


def to_md(rows, meta) -> str:
    out = ["# Eager vs `torch.compile` (inductor) training steps on the CPU", '',
           f"- command: `{meta['command']}`", f"- machine: {meta['cpu']} ({meta['threads']} torch threads); torch "
           f"{meta['torch']}, timm {meta['timm']}, Python {meta['python']}", f"- date: {meta['date']}",
           f"- setup: batch {meta['bs']}, {meta['size']}x{meta['size']} px, random data, SGD; {meta['repeats']} interleaved "
           f"rounds x {meta['steps']} steps after {meta['warmup']} warm-up steps; medians (method in the script's docstring)",
           '- load (`uptime` before and after each model; the machine is shared with other sessions):']
    out += [f"  - {m}: {' / '.join(l)}" for m, l in meta['load'].items()]
    out += ['', '| model | layout | precision | mode | ms/step | speed-up vs eager contiguous fp32 | compiled vs eager (same layout, precision) | compile s | break-even steps |',
            '|---|---|---|---|--:|--:|--:|--:|--:|']
    for r in rows:
        be = r.get('break_even_steps')
        out.append(f"| {r['model']} | {r['layout']} | {r['precision']} | {'compiled' if r['compiled'] else 'eager'} | "
                   f"{r['step_ms']:.0f} | {r['speedup']:.2f}x | {r['vs_eager']:.2f}x | "
                   f"{'' if r['compile_s'] is None else format(r['compile_s'], '.0f')} | "
                   f"{'' if not r['compiled'] else 'never' if be is None else format(be, '.0f')} |")
    return '\n'.join(out) + '\n'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=MODELS)
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'])
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--md', default=None)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # 4 compiled copies of one model class share its forward's code objects
    log = lambda m: print(f'[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {m}', file=sys.stderr, flush=True)
    import timm
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    meta = dict(command='python ' + ' '.join(sys.argv), cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version(), bs=args.bs, size=args.size, steps=args.steps,
                repeats=args.repeats, warmup=args.warmup,
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), load={})
    rows = []
    for name in args.models:
        r, load = bench_model(name, args, log)
        rows += r; meta['load'][name] = load
        md = to_md(rows, meta)
        if args.md: open(args.md, 'w').write(md)
        if args.json: open(args.json, 'w').write(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(to_md(rows, meta))


if __name__ == '__main__': main()
