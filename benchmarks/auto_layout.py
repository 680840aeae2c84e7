"""`ChannelsLast(auto=True)` against the faster fixed layout, over the zoo x {fp32, bf16}, on this machine.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/auto_layout.py                 # the whole zoo
    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/auto_layout.py resnet50 --precision bf16 --out /tmp/a.md

Per cell (model x precision) three `Learner`s train copies of the same randomly initialised model on the same
random batch (SGD with momentum; `MixedPrecision('bf16')` in all three for bf16):

* `contiguous`: no `ChannelsLast`;
* `channels_last`: `ChannelsLast()`;
* `auto`: `ChannelsLast(auto=True)`, which first runs its measuring steps (its default plan: both layouts in
  alternating blocks, warm-up steps after each switch untimed) and then keeps the layout it found faster.

The auto learner's measuring phase is one `fit` over exactly its measuring steps, timed as a whole (its cost).
Then the two fixed learners get `--warmup` untimed steps and the three are timed round-robin, the same method
as `channelslast-bench`: `--repeats` rounds, each one `fit` of `--steps` batches per learner (start rotating),
synchronised; medians of the rounds, and auto / faster-fixed as the median of the paired per-round ratios.

Reported per cell: the fixed layouts' step times, which is faster and by how much, auto's decision and the
ratio it measured, auto's steady-state speed as % of the faster fixed layout (target >= 97%), and the same
over a 1000-step run with the measuring phase included (`amortised`). Timings are noisy on a shared machine:
the spread column says how noisy. Writes a Markdown report (default `benchmarks/results/auto_layout.md`) and the
raw numbers as JSON beside it.
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
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.bench import create_model, device_name, synchronize
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner

ZOO = ['torchvision:resnet18', 'resnet50', 'efficientnet_b0', 'convnext_nano', 'mobilenetv3_large_100', 'regnety_008']
VARIANTS = ('contiguous', 'channels_last', 'auto')
HORIZON = 1000  # steps of a run the measuring phase is amortised over


def make_learner(model, batch, n_batches: int, precision: str, variant: str) -> Learner:
    "A quiet `Learner` on `n_batches` copies of `batch`, in `variant`'s layout and `precision`"
    cbs = [] if variant == 'contiguous' else [ChannelsLast(auto=variant == 'auto')]
    if precision != 'fp32': cbs.append(MixedPrecision(precision))
    learn = Learner(DataLoaders([batch] * n_batches), model, loss_func=F.cross_entropy, lr=1e-4,
                    opt_func=partial(torch.optim.SGD, momentum=0.9), cbs=cbs, progress=False)
    learn.recorder.print_table = False
    return learn


def timed_fit(learn: Learner, batches) -> float:
    "Seconds for one `fit` over `batches`, synchronised"
    learn.dls.train = batches
    synchronize(learn.device); t0 = time.perf_counter()
    learn.fit(1)
    synchronize(learn.device)
    return time.perf_counter() - t0


def bench_cell(name: str, precision: str, batch_size: int, img_size: int, steps: int, repeats: int, warmup: int,
               log) -> dict:
    "Decide with auto, then time the three learners round-robin; one result dict"
    torch.manual_seed(0)
    model, bare, source = create_model(name)
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.no_grad(): n_out = model.eval()(x[:2]).shape[1]
    batch = (x, torch.randint(0, n_out, (batch_size,)))
    learners = {v: make_learner(copy.deepcopy(model), batch, steps, precision, v) for v in VARIANTS}
    auto_cb = learners['auto'].channels_last
    n_measure = auto_cb.rounds * 2 * (auto_cb.warmup + auto_cb.block)  # its plan: both layouts, `rounds` blocks each
    log(f'{bare} {precision}: auto measures on {n_measure} steps')
    t_measure = timed_fit(learners['auto'], [batch] * n_measure)
    d = auto_cb.decision
    if d is None: raise RuntimeError(f"{bare} {precision}: ChannelsLast(auto=True) made no decision in {n_measure} steps")
    log(f"{bare} {precision}: auto chose {d['layout']} (channels-last at {d['ratio']:.3f}x contiguous)")
    for v in ('contiguous', 'channels_last'):
        if warmup: timed_fit(learners[v], [batch] * warmup)
    times = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            times[v].append(timed_fit(learners[v], [batch] * steps) / steps)
        log(f"{bare} {precision} round {r + 1}/{repeats}: " + ', '.join(f'{v} {times[v][-1] * 1e3:.0f} ms' for v in VARIANTS))
    med = {v: statistics.median(t) for v, t in times.items()}
    faster = min(('contiguous', 'channels_last'), key=med.get)
    paired = statistics.median(f / a for f, a in zip(times[faster], times['auto']))  # the same round
    cl_vs_cont = statistics.median(c / l for c, l in zip(times['contiguous'], times['channels_last']))
    amortised = HORIZON * med[faster] / (t_measure + (HORIZON - n_measure) * med['auto'])
    spread = max((max(t) - min(t)) / statistics.median(t) for t in times.values())
    return dict(model=bare, source=source, precision=precision, batch_size=batch_size, img_size=img_size,
                steps=steps, repeats=repeats, contiguous_ms=med['contiguous'] * 1e3, channels_last_ms=med['channels_last'] * 1e3,
                auto_ms=med['auto'] * 1e3, faster=faster, channels_last_speedup=cl_vs_cont, auto_layout=d['layout'],
                auto_measured_ratio=d['ratio'], auto_measure_steps=n_measure, auto_measure_s=t_measure,
                auto_pct_of_faster=100 * paired, auto_pct_amortised=100 * amortised, spread_pct=100 * spread,
                times_s={v: t for v, t in times.items()}, auto_decision_times_s=d['times'])


def report(rows: list[dict], meta: dict) -> str:
    "The Markdown report"
    ok = all(r['auto_pct_of_faster'] >= 97 for r in rows)
    lines = [
        '# `ChannelsLast(auto=True)` vs the faster fixed layout', '',
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']} ({meta['threads']} torch threads); torch {meta['torch']}, timm {meta['timm']}",
        f"- date: {meta['date']}",
        f"- setup: batch {rows[0]['batch_size']}, {rows[0]['img_size']}x{rows[0]['img_size']} px, random data, SGD; "
        f"timed: {rows[0]['repeats']} interleaved rounds x {rows[0]['steps']} steps per learner after auto's "
        f"{rows[0]['auto_measure_steps']} measuring steps; medians (method in the docstring of `benchmarks/auto_layout.py`)",
        '',
        '| model | precision | contiguous ms | channels-last ms | channels-last speed-up | auto chose (measured ratio) '
        '| auto ms | auto % of faster fixed | amortised over 1000 steps | spread |',
        '|---|---|--:|--:|--:|---|--:|--:|--:|--:|']
    for r in rows:
        flag = '' if r['auto_pct_of_faster'] >= 97 else ' **(< 97%)**'
        lines.append(f"| {r['model']} ({r['source']}) | {r['precision']} | {r['contiguous_ms']:.0f} | "
                     f"{r['channels_last_ms']:.0f} | {r['channels_last_speedup']:.3f}x | {r['auto_layout']} "
                     f"({r['auto_measured_ratio']:.3f}x) | {r['auto_ms']:.0f} | {r['auto_pct_of_faster']:.1f}%{flag} | "
                     f"{r['auto_pct_amortised']:.1f}% | {r['spread_pct']:.0f}% |")
    worst = min(rows, key=lambda r: r['auto_pct_of_faster'])
    lines += ['', f"Target (auto >= 97% of the faster fixed layout on every cell): **{'met' if ok else 'not met'}**; "
              f"worst cell {worst['model']} {worst['precision']} at {worst['auto_pct_of_faster']:.1f}%.", '',
              '`channels-last speed-up` is contiguous time / channels-last time (paired per round); `auto % of faster '
              'fixed` is the faster fixed step time / auto step time, median of the paired per-round ratios, after '
              "auto's decision; `amortised` adds the measuring phase (timed as a whole) to a 1000-step run. "
              '`spread` is the largest (max - min) / median of the three learners\' round times: differences '
              'smaller than it are noise.']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*', default=ZOO, help=f"model names (default: the zoo: {' '.join(ZOO)})")
    p.add_argument('--precision', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16', 'fp16'], help="precisions")
    p.add_argument('--batch-size', type=int, default=16, help="samples per step (default: 16)")
    p.add_argument('--img-size', type=int, default=128, help="input height and width (default: 128)")
    p.add_argument('--steps', type=int, default=3, help="timed steps per learner per round (default: 3)")
    p.add_argument('--repeats', type=int, default=4, help="interleaved rounds (default: 4)")
    p.add_argument('--warmup', type=int, default=2, help="untimed steps of each fixed learner first (default: 2)")
    p.add_argument('--out', type=Path, default=Path('benchmarks/results/auto_layout.md'), help="the Markdown report")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    import timm
    cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    model_name = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('Model name')), device_name('cpu'))
    meta = dict(command='flock /tmp/cl_bench.lock .venv/bin/python benchmarks/auto_layout.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
                machine=f'{model_name}, {platform.machine()}', threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        for prec in args.precision:
            rows.append(bench_cell(name, prec, args.batch_size, args.img_size, args.steps, args.repeats, args.warmup, log))
            log(f"  -> auto at {rows[-1]['auto_pct_of_faster']:.1f}% of the faster fixed layout "
                f"({time.perf_counter() - t0:.0f} s so far)")
    meta['wall_s'] = round(time.perf_counter() - t0)
    text = report(rows, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + f"\nWall time {meta['wall_s']} s. Raw numbers: `{args.out.with_suffix('.json').name}`.\n")
    args.out.with_suffix('.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + '\n')
    log(f'wrote {args.out} and {args.out.with_suffix(".json")}')


if __name__ == '__main__':
    main()
