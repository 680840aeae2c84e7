"""The field side by side: one timm model's training step in plain PyTorch loops (layout x precision), this library's
default `learn.to_channelslast()` and `to_channelslast(auto=True)`, fastai's own `to_channelslast()`, fastai with
`import channelslast_cb.fastai`, and Lightning (`32-true`, `bf16-mixed`, channels-last written by hand), all in one
process, interleaved, at steady state.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/peers.py                           # table on stdout
    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/peers.py --out benchmarks/results/peers.md

Each variant trains its own copy of the same randomly initialised model (timm `resnet18` by default, 96 px, batch
16, SGD with momentum) on one fixed batch, so that data loading is not timed. Every step is timed on its own, from
the moment the batch is handed to the loop (the Learners' `before_batch`, Lightning's `on_train_batch_start`) to the
end of the optimizer step, so that each fit's start-up (building a Trainer, a fit's callbacks, the precision probe)
is not counted. Each round runs `--steps` + `--skip` steps of every variant, the order rotating each round; the
first `--skip` steps of a fit are dropped (a new fit runs cold). A variant's figure is the median over rounds of its
round's median step; speed-ups are medians over rounds of per-round ratios (paired: load drifting on a shared
machine cancels), against plain contiguous fp32 and against the best plain loop (the plain setting with the lowest
median step). Before round 1 every variant runs a warm-up fit; `auto=True` runs until it has decided, and the
extra time its measuring steps cost (against its steady step time) is reported in steps.

fastai's own `to_channelslast()` and fastai with our import share one process: `unpatch_fastai()` /
`patch_fastai()` switch fastai's `Learner` between its own methods and ours around each of their fits. Lightning's
variants need `lightning`; a variant whose package is missing is left out (said on stderr).
"""
import argparse
import copy
import datetime
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
from torch.utils.data import DataLoader, TensorDataset

CL = torch.channels_last
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def make_model(name):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10)


def sgd(params, lr=1e-3): return torch.optim.SGD(params, lr=lr, momentum=0.9)


class PlainLoop:
    "The hand-written step, in `layout` (the batch converted every step, as a loader's would be) and `precision`"
    def __init__(self, model, batch, layout, precision):
        self.cl, self.precision = layout == 'channels_last', precision
        self.model = model.to(memory_format=CL) if self.cl else model
        self.opt, self.batch = sgd(self.model.parameters()), batch
        self.scaler = torch.amp.GradScaler('cpu') if precision == 'fp16' else None

    def run(self, n):
        x, y = self.batch
        times = []
        for _ in range(n):
            t = time.perf_counter()
            xb = x.contiguous(memory_format=CL) if self.cl else x
            with torch.autocast('cpu', dtype=DTYPES.get(self.precision), enabled=self.precision != 'fp32'):
                loss = F.cross_entropy(self.model(xb).float(), y)
            if self.scaler is None:
                loss.backward()
                self.opt.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        return times


def our_timer_cbs(times):
    "Two of our callbacks around every other one: the clock starts first at before_batch and stops last at after_batch"
    from channelslast_cb.core import Callback
    start, stop = Callback(), Callback()
    start.order, stop.order = -1000, 1000
    start.before_batch = lambda: times.append(time.perf_counter())
    stop.after_batch = lambda: times.append(time.perf_counter() - times.pop())
    return [start, stop]


class OurLearner:
    "channelslast_cb's Learner, set up by `setup(learn)` (e.g. `learn.to_channelslast()`)"
    def __init__(self, model, batch, setup):
        from channelslast_cb.all import DataLoaders, Learner  # (all: the Learner's to_* helpers too)
        self.DataLoaders, self.batch, self.times = DataLoaders, batch, []
        self.learn = Learner(DataLoaders([batch]), model, loss_func=F.cross_entropy, opt_func=sgd, progress=False)
        self.learn.recorder.print_table = False
        setup(self.learn)
        self.learn.add_cbs(our_timer_cbs(self.times))

    def run(self, n):
        self.times.clear()
        self.learn.dls = self.DataLoaders([self.batch] * n)
        self.learn.fit(1)
        return list(self.times)

    @property
    def decision(self): return getattr(getattr(self.learn, 'channels_last', None), 'decision', None)


class FastaiLearner:
    "fastai's own Learner, set up by `setup(learn)`; `ours`: with `import channelslast_cb.fastai`'s methods in force"
    def __init__(self, model, batch, setup, ours):
        import channelslast_cb.fastai as clfa
        from fastai.callback.core import Callback as FaiCallback
        from fastai.data.core import DataLoaders as FaiDataLoaders
        from fastai.learner import Learner as FaiLearner
        from fastai.optimizer import OptimWrapper
        self.clfa, self.ours, self.batch, self.times = clfa, ours, batch, []
        times = self.times

        class Start(FaiCallback):
            order, run_valid = -1000, False
            def before_batch(self): times.append(time.perf_counter())

        class Stop(FaiCallback):
            order, run_valid = 1000, False
            def after_batch(self): times.append(time.perf_counter() - times.pop())

        x, y = batch
        bs = len(y)
        # the batch repeated: a TensorDataset in fastai's own DataLoaders (a validation set it needs: not timed)
        self.make_dls = lambda n: FaiDataLoaders.from_dsets(TensorDataset(x.repeat(n, 1, 1, 1), y.repeat(n)),
                                                            TensorDataset(x[:2], y[:2]), bs=bs, shuffle=False, device='cpu',
                                                            num_workers=0)  # no loader processes competing for the cores
        with self.fastai_as_set():
            opt_func = partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9)  # the same torch SGD as the others
            self.learn = FaiLearner(self.make_dls(1), model, loss_func=F.cross_entropy, opt_func=opt_func,
                                    cbs=[Start(), Stop()])
            setup(self.learn)

    def fastai_as_set(self):
        import contextlib
        @contextlib.contextmanager
        def ctx():
            (self.clfa.patch_fastai if self.ours else self.clfa.unpatch_fastai)()
            try: yield
            finally: self.clfa.patch_fastai()
        return ctx()

    def run(self, n):
        self.times.clear()
        with self.fastai_as_set(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # fastai's own CPU autocast warns that it is disabled, every fit
            self.learn.dls = self.make_dls(n)
            with self.learn.no_bar(), self.learn.no_logging(): self.learn.fit(1, 1e-3)
        return list(self.times)


class LightningRun:
    "Lightning's Trainer at `precision`, a new Trainer per fit; `cl`: channels-last written by hand in the module"
    def __init__(self, model, batch, precision, cl, extra_cbs=()):
        import lightning as L
        self.L, self.batch, self.precision, self.extra_cbs, self.times = L, batch, precision, extra_cbs, []
        times = self.times

        class Module(L.LightningModule):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def on_fit_start(self):  # the usual hand-written conversion: the module, then each batch
                if cl: self.net.to(memory_format=CL)

            def training_step(self, b, i):
                x, y = b
                if cl: x = x.contiguous(memory_format=CL)
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self): return sgd(self.parameters())

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer, module, b, i): times.append(time.perf_counter())
            def on_train_batch_end(self, trainer, module, out, b, i): times.append(time.perf_counter() - times.pop())

        self.module, self.timer = Module(model), Timer()

    def run(self, n):
        self.times.clear()
        trainer = self.L.Trainer(accelerator='cpu', devices=1, precision=self.precision, max_steps=n, max_epochs=1,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0,
                                 callbacks=[self.timer, *self.extra_cbs])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "does not have many workers", "bf16-mixed on CPU"...
            x, y = self.batch  # the batch repeated (fetching it is not timed)
            dl = DataLoader(TensorDataset(x.repeat(n, 1, 1, 1), y.repeat(n)), batch_size=len(y))
            trainer.fit(self.module, train_dataloaders=dl)
        return list(self.times)


def variants(args, batch):
    "name -> a function that builds the runner (each on its own copy of the model)"
    model = make_model(args.model)
    fresh = lambda: copy.deepcopy(model)
    v = {}
    for p in ('fp32', *args.precisions):
        for layout in ('contiguous', 'channels_last'):
            v[f'plain loop, {layout}, {p}'] = partial(lambda l, p: PlainLoop(fresh(), batch, l, p), layout, p)
    v['ours: learn.to_channelslast()'] = lambda: OurLearner(fresh(), batch, lambda l: l.to_channelslast())
    v['ours: learn.to_channelslast(auto=True)'] = lambda: OurLearner(fresh(), batch, lambda l: l.to_channelslast(auto=True))
    try:
        import fastai  # noqa: F401
        v["fastai 2.8's own learn.to_channelslast()"] = lambda: FastaiLearner(fresh(), batch, lambda l: l.to_channelslast(), False)
        v['fastai + import channelslast_cb.fastai: learn.to_channelslast()'] = \
            lambda: FastaiLearner(fresh(), batch, lambda l: l.to_channelslast(), True)
    except ImportError: print('peers: fastai is not installed: its variants are left out', file=sys.stderr)
    try:
        import lightning  # noqa: F401
        for prec in ('32-true', 'bf16-mixed'):
            v[f"Lightning precision='{prec}'"] = partial(lambda p: LightningRun(fresh(), batch, p, False), prec)
            v[f"Lightning precision='{prec}', channels-last by hand"] = partial(lambda p: LightningRun(fresh(), batch, p, True), prec)
        try:
            from channelslast_cb.lightning import ChannelsLast as LitChannelsLast
            v["Lightning precision='32-true' + channelslast_cb.lightning.ChannelsLast()"] = \
                lambda: LightningRun(fresh(), batch, '32-true', False, [LitChannelsLast()])
        except ImportError: pass
    except ImportError: print('peers: lightning is not installed: its variants are left out', file=sys.stderr)
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='resnet18')
    p.add_argument('--img-size', type=int, default=96)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--steps', type=int, default=3, help='timed steps per variant per round')
    p.add_argument('--skip', type=int, default=1, help='untimed first steps of each fit')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--precisions', nargs='*', default=['bf16', 'fp16'], choices=['bf16', 'fp16'],
                   help='16-bit modes of the plain loops (fp32 always)')
    p.add_argument('--only', nargs='*', help='keep the variants whose name contains one of these strings')
    p.add_argument('--out', help='also write the Markdown table to this file')
    p.add_argument('--json', help='also write every round\'s median step time (seconds) per variant to this file')
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g))
    builders = variants(args, batch)
    if args.only: builders = {k: b for k, b in builders.items() if any(s in k for s in args.only)}
    load0, t0 = os.getloadavg(), time.time()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    runners, notes = {}, {}
    for name, build in builders.items():  # build and warm up every variant (auto=True: until it has decided)
        runners[name] = r = build()
        log(f'warm-up: {name}')
        first = r.run(args.skip + args.steps)
        if isinstance(r, OurLearner) and r.learn.channels_last.auto:
            steps = list(first)
            while r.decision is None: steps += r.run(8)
            d = r.decision
            notes[name] = (d, steps[:d.steps])
    ref = 'plain loop, contiguous, fp32'
    rounds = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            t = runners[name].run(args.skip + args.steps)[args.skip:]
            rounds[name].append(statistics.median(t))
        log(f'round {i + 1}/{args.rounds}: ' + ', '.join(f'{n.split(":")[0][:24]} {rounds[n][-1] * 1e3:.0f}' for n in names))
    load1 = os.getloadavg()
    from channelslast_cb.bench import device_name  # (here: no import of ours before the variants are set up)
    med = lambda xs: statistics.median(xs)
    # the best plain setting: the plain loop with the lowest median step, chosen once (a per-round minimum over the
    # plain loops would pick each round's luckiest one, and read every other variant slower than it is)
    best = min((n for n in names if n.startswith('plain loop')), key=lambda n: med(rounds[n]))
    lines = [f"`benchmarks/peers.py {' '.join(sys.argv[1:] if argv is None else argv)}`: timm `{args.model}`, "
             f"{args.img_size} px, batch {args.batch_size}, SGD; {device_name('cpu')}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, Python {platform.python_version()}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {(time.time() - t0) / 60:.0f} min; "
             f"load average {load0[0]:.1f} before, {load1[0]:.1f} after. {args.rounds} rounds x {args.steps} timed "
             f"steps per variant (after {args.skip} untimed), interleaved.", '',
             f'| variant | ms/step | vs plain contiguous fp32 | vs the best plain loop ({best.split(", ", 1)[1]}) |',
             '|---|---:|---:|---:|']
    for n in names:
        vs_ref = med([a / b for a, b in zip(rounds[ref], rounds[n])])
        vs_best = med([a / b for a, b in zip(rounds[best], rounds[n])])
        lines.append(f'| {n} | {med(rounds[n]) * 1e3:,.0f} | {vs_ref:.2f}x | {vs_best:.2f}x |')
    for n, (d, steps) in notes.items():
        steady = med(rounds[n])
        lines += ['', f'{n}: {d}. The {d.steps} measuring steps took {sum(steps):.1f} s, '
                      f'{sum(steps) / steady - d.steps:.1f} steps more than {d.steps} steady steps of the setting kept.']
    if "fastai 2.8's own learn.to_channelslast()" in rounds:
        a, b = rounds["fastai 2.8's own learn.to_channelslast()"], rounds['fastai + import channelslast_cb.fastai: learn.to_channelslast()']
        lines += ['', f'fastai with our import against fastai\'s own to_channelslast(): {med([x / y for x, y in zip(a, b)]):.2f}x '
                      f'(per-round paired median; above 1: ours faster).']
    from channelslast_cb.fp16 import AMP_SPEEDS
    if AMP_SPEEDS: lines += ['', 'The probe on this machine: ' + '; '.join(str(s) for s in AMP_SPEEDS.values()) + '.']
    out = '\n'.join(lines)
    print(out)
    if args.out:
        with open(args.out, 'w') as f: f.write(out + '\n')
    if args.json:
        with open(args.json, 'w') as f: json.dump(dict(table=out, rounds=rounds), f, indent=1)


if __name__ == '__main__':
    main()
