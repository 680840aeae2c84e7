"""bf16 mixed precision speed on this CPU: a hand-written autocast loop against our Learner's `to_bf16()`.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/amp_speed.py                     # table on stdout
    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/amp_speed.py --out benchmarks/results/fp16.md

A resnet50 (timm, random init) training step at 128 px, batch 16, SGD with momentum, on `--threads` CPU threads.
Variants, each with its own copy of the same initial model and one fixed batch (so data loading is not timed):

- `fp32 loop`: the plain PyTorch step;
- `bf16 loop`: the same step with the forward pass and loss under `torch.autocast('cpu', dtype=torch.bfloat16)`;
- `Learner.to_bf16()`: `channelslast_cb`'s Learner with `MixedPrecision('bf16')`, `fit(1)` over `--steps` batches;
- `fastai to_bf16()`: fastai's Learner with its `MixedPrecision('bf16')`, when fastai is installed.

Every round times `--steps` steps of every variant, round-robin, the order rotating each round; one warm-up step
of each is not timed. Reported: the median seconds per step over `--repeats` rounds, the speed-up against `fp32 loop`, and
the Learner's speed as a fraction of the `bf16 loop`'s (also as the median of the per-round ratios, which is less
sensitive to load drifting on a shared machine).
"""
import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F


def make_model():
    import timm
    torch.manual_seed(0)
    return timm.create_model('resnet50', pretrained=False, num_classes=1000)


def make_batch(bs, size):
    g = torch.Generator().manual_seed(0)
    return torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 1000, (bs,), generator=g)


def sgd(params, lr=1e-3): return torch.optim.SGD(params, lr=lr, momentum=0.9)


# A runner maps `n` to a function that trains `n` steps. Only that function is timed: the Learners' DataLoaders
# of `n` batches are built before the clock starts.

def loop_runner(model, batch, dtype=None):
    "The hand-written step; under bf16 autocast when `dtype` is given"
    opt, (x, y) = sgd(model.parameters()), batch
    ctx = partial(torch.autocast, 'cpu', dtype=dtype) if dtype is not None else None

    def timed(n):
        model.train()
        for _ in range(n):
            if ctx is None: loss = F.cross_entropy(model(x), y)
            else:
                with ctx(): loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return lambda n: lambda: timed(n)


def learner_runner(model, batch):
    from channelslast_cb.fp16 import MixedPrecision  # noqa: F401  (patches Learner.to_bf16)
    from channelslast_cb.learner import DataLoaders, Learner
    learn = Learner(DataLoaders([batch]), model, loss_func=F.cross_entropy, opt_func=sgd, progress=False)
    learn.recorder.print_table = False
    learn.to_bf16()

    def prepare(n):
        learn.dls = DataLoaders([batch] * n)
        return lambda: learn.fit(1)
    return prepare


def fastai_runner(model, batch):
    from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (patches Learner.to_bf16)
    from fastai.data.core import DataLoaders as FDataLoaders
    from fastai.learner import Learner as FLearner
    from fastai.optimizer import OptimWrapper
    learn = FLearner(FDataLoaders([batch], [], device='cpu'), model, loss_func=F.cross_entropy,
                     opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9)).to_bf16()

    def fit():
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "CUDA is not available ... Disabling autocast": it runs fp32 on CPU
            learn.fit(1, lr=1e-3)

    def prepare(n):
        learn.dls = FDataLoaders([batch] * n, [], device='cpu')
        return fit
    return prepare


def bench(steps=2, repeats=5, bs=16, size=128, threads=2, with_fastai=True):
    torch.set_num_threads(threads)
    base, batch = make_model(), make_batch(bs, size)
    runners = {'fp32 loop': loop_runner(copy.deepcopy(base), batch),
               'bf16 loop': loop_runner(copy.deepcopy(base), batch, torch.bfloat16),
               'Learner.to_bf16()': learner_runner(copy.deepcopy(base), batch)}
    if with_fastai:
        try: runners['fastai to_bf16()'] = fastai_runner(copy.deepcopy(base), batch)
        except ImportError as e: print(f"fastai not installed ({e}); skipping it", file=sys.stderr)
    del base
    names = list(runners)
    for k in names: runners[k](1)()  # warm-up: one step of each, not timed
    times, cpu = {k: [] for k in names}, {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            run = runners[k](steps)
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[k].append((time.perf_counter() - t0) / steps)
            cpu[k].append((time.process_time() - c0) / steps)
    return times, cpu


def report(times, cpu, args, cmd) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    fp32, hand = med['fp32 loop'], med['bf16 loop']
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    lines = ['| variant | median s/step (wall) | speed-up vs fp32 loop | raw s/step per round (wall) | '
             'median CPU s/step | speed-up (CPU time) |', '|---|---|---|---|---|---|']
    for k, m in med.items():
        lines.append(f"| {k} | {m:.3f} | {fp32 / m:.2f}x | {', '.join(f'{t:.3f}' for t in times[k])} | "
                     f"{cmed[k]:.3f} | {cmed['fp32 loop'] / cmed[k]:.2f}x |")
    frac = hand / med['Learner.to_bf16()']
    paired = statistics.median(h / l for h, l in zip(times['bf16 loop'], times['Learner.to_bf16()']))
    cfrac = cmed['bf16 loop'] / cmed['Learner.to_bf16()']
    try: cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    except OSError: cpu = ''
    model_name = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('Model name')), platform.processor())
    import timm
    try:
        import fastai; fa = fastai.__version__
    except ImportError: fa = 'not installed'
    load = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    head = [f"Command: `{cmd}`", '',
            f"Load average when the report was written (1/5/15 min): {load} (the machine is shared).",
            f"Machine: {model_name} (`lscpu | grep 'Model name'`), {args.threads} threads, "
            f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, fastai {fa}",
            f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"Work: resnet50 (timm, random init) training step, batch {args.bs}, {args.size} px, SGD momentum 0.9; "
            f"{args.steps} steps per variant per round, {args.repeats} interleaved rounds after one warm-up step each. "
            f"CPU time is the process's (all threads), less sensitive to other processes than wall time.",
            '']
    tail = ['', f"**Learner.to_bf16() runs at {frac:.1%} of the hand-written bf16 loop's speed** "
                f"(median of per-round ratios: {paired:.1%}; by CPU time: {cfrac:.1%}; target >= 95%).",
            f"bf16 loop speed-up over fp32: {fp32 / hand:.2f}x; Learner.to_bf16(): {fp32 / med['Learner.to_bf16()']:.2f}x."]
    if 'fastai to_bf16()' in med:
        tail.append(f"fastai to_bf16(): {fp32 / med['fastai to_bf16()']:.2f}x (its autocast is `autocast('cuda')`, "
                    f"which torch disables on a CPU-only machine, so it trains in float32).")
    return '\n'.join(head + lines + tail) + '\n'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=2, help='training steps per variant per round')
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds; medians are reported')
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--no-fastai', action='store_true', help="leave fastai's to_bf16() out")
    p.add_argument('--out', help='also write the report (Markdown) to this file')
    a = p.parse_args()
    cmd = ' '.join(['python', *sys.argv])
    t0 = time.perf_counter()
    times, cpu = bench(a.steps, a.repeats, a.bs, a.size, a.threads, not a.no_fastai)
    text = report(times, cpu, a, cmd) + f"\nTotal benchmark time: {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if a.out:
        with open(a.out, 'w') as f: f.write('# bf16 mixed precision speed (issue 3)\n\n' + text)


if __name__ == '__main__':
    main()
