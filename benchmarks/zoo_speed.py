"""Training-step speed of the model zoo on this CPU: contiguous fp32, hand-written channels-last loops, our Learner
with `to_channelslast(amp_mode='bf16')` and fastai's, side by side in one process.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/zoo_speed.py --steps 3 --repeats 7 --md out.md

Per model, every variant gets its own copy of the same randomly initialised model and its own SGD (momentum 0.9)
optimizer, and trains on the same `--steps` batches (`--bs` x 3 x `--size` x `--size`, handed over contiguous, as a
data loader yields them). One timed repeat = `--steps` training steps of one variant. Variants run round-robin
(each round times every variant once, the starting variant rotating from round to round), `--warmup` rounds are
not timed, and the median over `--repeats` rounds is reported as ms per step. `--max-minutes` caps the run: a
model stops after 5 timed rounds once it would overrun its share of the budget (the table says how many ran).
`--variants` times a subset (e.g. `hand_cl_bf16 ours_cl_bf16` to re-measure the Learner's fraction alone).

Variants:
  contig_fp32      our Learner, contiguous, float32 (the baseline of the speed-ups)
  hand_contig_fp32 hand-written loop, contiguous, float32
  hand_cl_fp32     hand-written loop, channels-last model and inputs, float32
  hand_cl_bf16     hand-written loop, channels-last, torch.autocast('cpu', bfloat16) around the forward pass
  ours_cl_bf16     our Learner after learn.to_channelslast(amp_mode='bf16')
  fastai_cl_bf16   fastai 2.8's Learner after learn.to_channelslast(amp_mode='bf16') (when fastai is installed)

A forward hook on each variant's first convolution records, during the warm-up, the dtype and layout it really
computed in (fastai's MixedPrecision enters autocast('cuda'), which does nothing on the CPU: it trains in fp32).
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ['resnet18', 'resnet50', 'efficientnet_b0', 'convnext_nano', 'mobilenetv3_large_100', 'regnety_008']
CL = torch.channels_last
LR, MOM = 0.01, 0.9


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == 'resnet18':
        import torchvision
        return torchvision.models.resnet18(weights=None)
    import timm
    return timm.create_model(name, pretrained=False)


def make_batches(n: int, bs: int, size: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 1000, (bs,), generator=g)) for _ in range(n)]


def hand_runner(model: nn.Module, batches: list, channels_last: bool, bf16: bool):
    "The loop a user would write by hand: the same work as the Learner's training step, nothing else"
    if channels_last: model = model.to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    ctx = partial(torch.autocast, 'cpu', dtype=torch.bfloat16) if bf16 else contextlib.nullcontext

    def run():
        model.train()
        for x, y in batches:
            if channels_last: x = x.contiguous(memory_format=CL)
            with ctx(): out = model(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run, model


def ours_runner(model: nn.Module, batches: list, cl_bf16: bool):
    from channelslast_cb.learner import DataLoaders, Learner
    learn = Learner(DataLoaders(batches), model, loss_func=F.cross_entropy, lr=LR,
                    opt_func=partial(torch.optim.SGD, momentum=MOM), progress=False)
    learn.recorder.print_table = False
    if cl_bf16:
        import channelslast_cb.channelslast  # noqa: F401  (patches Learner.to_channelslast)
        learn.to_channelslast(amp_mode='bf16')
    return (lambda: learn.fit(1)), learn.model


def fastai_runner(model: nn.Module, batches: list):
    import fastai.callback.channelslast  # noqa: F401  (patches fastai's Learner.to_channelslast)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import OptimWrapper
    learn = Learner(DataLoaders(batches, [], device='cpu'), model, loss_func=F.cross_entropy, lr=LR,
                    opt_func=partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=MOM)))
    learn.to_channelslast(amp_mode='bf16')
    bar = learn.no_bar if hasattr(learn, 'no_bar') else contextlib.nullcontext

    def run():
        with learn.no_logging(), bar(): learn.fit(1, lr=LR)  # the validation set is empty: training steps only
    return run, learn.model


VARIANTS = {'contig_fp32': lambda m, b: ours_runner(m, b, cl_bf16=False),
            'hand_contig_fp32': lambda m, b: hand_runner(m, b, channels_last=False, bf16=False),
            'hand_cl_fp32': lambda m, b: hand_runner(m, b, channels_last=True, bf16=False),
            'hand_cl_bf16': lambda m, b: hand_runner(m, b, channels_last=True, bf16=True),
            'ours_cl_bf16': lambda m, b: ours_runner(m, b, cl_bf16=True),
            'fastai_cl_bf16': fastai_runner}


def build(name: str, batches: list, variants: list) -> dict:
    base = make_model(name)
    return {k: VARIANTS[k](copy.deepcopy(base), batches) for k in variants}


def first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def time_model(name: str, steps: int, bs: int, size: int, warmup: int, repeats: int, variants: list,
               deadline: float = float('inf'), min_repeats: int = 5) -> dict:
    "Time every variant on `name`; stop after `min_repeats` timed rounds once the next round would end past `deadline`"
    batches = make_batches(steps, bs, size)
    runners = build(name, batches, variants)
    names = list(runners)
    seen, hooks = {}, []
    def hook_for(k):
        def hook(m, i, o):  # returns None: the output is left as it is
            seen.setdefault(k, (str(o.dtype).replace('torch.', ''), 'CL' if o.is_contiguous(memory_format=CL) else 'NCHW'))
        return hook
    for k, (_, model) in runners.items(): hooks.append(first_conv(model).register_forward_hook(hook_for(k)))
    times, load = {k: [] for k in names}, [os.getloadavg()[0]]
    for r in range(warmup + repeats):
        t_round = time.time()
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first or last
        for k in order:
            run = runners[k][0]
            gc.collect()
            t0 = time.perf_counter()
            run()
            dt = (time.perf_counter() - t0) / steps
            if r >= warmup: times[k].append(dt)
        if r == warmup - 1:
            for h in hooks: h.remove()
        print(f"  {name} round {r + 1}/{warmup + repeats}{'' if r >= warmup else ' (warm-up)'}: "
              + ' '.join(f"{k}={times[k][-1] * 1e3:.0f}ms" for k in order if r >= warmup), file=sys.stderr, flush=True)
        done = r + 1 - warmup
        if done >= min_repeats and r + 1 < warmup + repeats and time.time() + (time.time() - t_round) > deadline:
            print(f"  {name}: stopping after {done} timed rounds to stay within the time budget", file=sys.stderr)
            break
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    res = dict(model=name, repeats=len(times[names[0]]), ms={k: v * 1e3 for k, v in med.items()},
               raw_ms={k: [t * 1e3 for t in v] for k, v in times.items()}, computes_in=seen, load=load)
    if {'hand_cl_bf16', 'ours_cl_bf16'} <= med.keys():
        res['ours_fraction'] = med['hand_cl_bf16'] / med['ours_cl_bf16']
        # paired per round: hand-written cl+bf16 time / our Learner's time in the same round (robust to load drift)
        res['ours_fraction_paired'] = statistics.median(h / o for h, o in zip(times['hand_cl_bf16'], times['ours_cl_bf16']))
    if {'hand_contig_fp32', 'hand_cl_fp32'} <= med.keys():
        res['raw_cl_speedup'] = med['hand_contig_fp32'] / med['hand_cl_fp32']
    return res


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def markdown(results: list, args, header: dict) -> str:
    cols = [k for k in VARIANTS if any(k in r['ms'] for r in results)]
    num = lambda v, fmt: '–' if v is None else format(v, fmt)
    out = [f"Median ms per training step (batch {args.bs}, {args.size} px, {args.steps} steps per timed repeat, "
           f"{args.repeats} interleaved repeats after {args.warmup} warm-up round(s), {args.threads} threads).", '',
           '| model | ' + ' | '.join(cols) + ' | repeats | load 1-min (start → end) |',
           '|---|' + '---:|' * len(cols) + '---:|---|']
    for r in results:
        out.append(f"| {r['model']} | " + ' | '.join(num(r['ms'].get(c), '.0f') for c in cols)
                   + f" | {r['repeats']} | {r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    sp = [c for c in cols if c != 'contig_fp32'] if 'contig_fp32' in cols else []
    out += ['', 'Speed-up vs our contiguous fp32 Learner (contig_fp32 ms / variant ms; > 1 is faster), the raw '
            'channels-last speed-up (hand_contig_fp32 / hand_cl_fp32), and our Learner\'s fraction of the hand-written '
            'channels-last + bf16 loop\'s speed (hand_cl_bf16 ms / ours_cl_bf16 ms; ratio of medians, and the median of '
            'per-round ratios):', '',
            '| model | ' + ''.join(f'{c} | ' for c in sp) + 'raw CL fp32 speed-up | ours / hand (medians) | ours / hand (paired) |',
            '|---|' + '---:|' * (len(sp) + 3)]
    for r in results:
        ms = r['ms']
        out.append(f"| {r['model']} | " + ''.join(f"{ms['contig_fp32'] / ms[c]:.2f}x | " if c in ms else '– | ' for c in sp)
                   + f"{num(r.get('raw_cl_speedup'), '.2f')}{'x' if 'raw_cl_speedup' in r else ''} | {num(r.get('ours_fraction'), '.1%')} | "
                   + f"{num(r.get('ours_fraction_paired'), '.1%')} |")
    out += ['', 'What the first convolution really computed in (dtype, output layout), recorded during the warm-up:', '',
            '| model | ' + ' | '.join(cols) + ' |', '|---|' + '---|' * len(cols)]
    for r in results:
        out.append(f"| {r['model']} | " + ' | '.join('{} {}'.format(*r['computes_in'][c]) if c in r['computes_in']
                                                     else '–' for c in cols) + ' |')
    out += ['', '```', *(f"{k}: {v}" for k, v in header.items()), '```']
    return '\n'.join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=MODELS)
    p.add_argument('--steps', type=int, default=3, help='training steps per timed repeat')
    p.add_argument('--repeats', type=int, default=7, help='interleaved timed rounds; the median is reported')
    p.add_argument('--warmup', type=int, default=1, help='rounds not timed')
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--max-minutes', type=float, default=24.,
                   help='time budget: a model stops after 5 timed rounds once it would overrun its share')
    p.add_argument('--no-fastai', action='store_true', help="leave fastai's Learner out")
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS), help='a subset to time')
    p.add_argument('--md', help='write the Markdown tables here')
    p.add_argument('--json', help='write every raw time here')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore', category=FutureWarning)  # fastai imports torch.cuda.amp.GradScaler
    # fastai's MixedPrecision builds autocast('cuda') on every fit; on the CPU torch answers with this warning and
    # turns autocast off: said once here (and visible in the dtype table), not on every repeat
    warnings.filterwarnings('once', message='CUDA is not available or torch_xla is imported. Disabling autocast.')
    with_fastai = not a.no_fastai and 'fastai_cl_bf16' in a.variants
    if with_fastai:
        try: import fastai  # noqa: F401
        except ImportError as e:
            print(f"fastai not installed ({e}): leaving it out", file=sys.stderr)
            with_fastai = False
    t0 = time.time()
    load_start = os.getloadavg()
    results = []
    for i, name in enumerate(a.models):
        share = (t0 + a.max_minutes * 60 - time.time()) / (len(a.models) - i)  # what is left, split over the rest
        variants = [v for v in a.variants if with_fastai or v != 'fastai_cl_bf16']
        results.append(time_model(name, a.steps, a.bs, a.size, a.warmup, a.repeats, variants, time.time() + share))
        gc.collect()
    import timm
    header = dict(load_avg_start=load_start, command=' '.join([os.path.basename(sys.executable), *sys.argv]),
                  date=datetime.datetime.now().isoformat(timespec='seconds'), machine=cpu_name(), cores=os.cpu_count(),
                  torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                  wall_s=round(time.time() - t0), load_avg_end=os.getloadavg())
    if with_fastai:
        import fastai
        header['fastai'] = fastai.__version__
    md = markdown(results, a, header)
    print(md)
    if a.md:
        with open(a.md, 'w') as f: f.write(md + '\n')
    if a.json:
        with open(a.json, 'w') as f: json.dump(dict(header=header, results=results), f, indent=1)


if __name__ == '__main__': main()
