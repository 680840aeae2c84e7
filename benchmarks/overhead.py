"""Per-batch framework overhead of the Learner against a hand-written PyTorch loop doing the same work.

    python benchmarks/overhead.py                 # overhead table (ours, and fastai's when installed)
    python benchmarks/overhead.py --memory 20000  # RSS growth over a 20,000-step fit
    python benchmarks/overhead.py --baseline ../other-checkout  # also another checkout's Learner, in the same rounds

A tiny model (1x1 conv + linear on 8x3x4x4 batches) makes the loop itself dominate. Each variant trains
`--batches` batches per repeat; variants run round-robin (interleaved) in one process, one thread, and the
median over `--repeats` rounds is reported (the starting variant rotates each round). Overhead = median over the rounds
of (variant time - plain time in the same round) / batches.
"""
import argparse
import gc
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def make_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]


def plain_runner(train, valid):
    "The hand-written loop: the same steps the Learner does, nothing else."
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dev = torch.device('cpu')

    def run():
        model.train()
        for x, y in train:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            for x, y in valid: F.cross_entropy(model(x.to(dev)), y.to(dev))
    return run


def _load_package(root, alias):
    "Import the `channelslast_cb` package found in checkout `root` under the name `alias` (its imports are relative)"
    import importlib.util
    from pathlib import Path
    init = Path(root) / 'channelslast_cb' / '__init__.py'
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f'{alias}.learner')


def ours_runner(train, valid, baseline=None):
    if baseline is None: from channelslast_cb.learner import DataLoaders, Learner
    else:
        lrn = _load_package(baseline, 'channelslast_cb_baseline')
        DataLoaders, Learner = lrn.DataLoaders, lrn.Learner
    learn = Learner(DataLoaders(train, valid), tiny_model(), loss_func=F.cross_entropy, progress=False)
    learn.recorder.print_table = False
    learn.create_opt()
    return lambda: learn.fit(1)


def fastai_runner(train, valid):
    from fastai.data.core import DataLoaders as FDataLoaders
    from fastai.learner import Learner as FLearner
    from fastai.optimizer import OptimWrapper
    learn = FLearner(FDataLoaders(train, valid, device='cpu'), tiny_model(), loss_func=F.cross_entropy,
                     opt_func=partial(OptimWrapper, opt=torch.optim.AdamW))

    def run():
        with learn.no_logging(): learn.fit(1, lr=1e-3)  # fastai.callback.progress is not imported: no bar
    return run


def overhead(batches=500, repeats=7, baseline=None):
    torch.set_num_threads(1)
    train, valid = make_batches(batches), make_batches(1, seed=1)
    runners = {'plain': plain_runner(train, valid), 'channelslast_cb': ours_runner(train, valid)}
    if baseline: runners['baseline'] = ours_runner(train, valid, baseline)
    try: runners['fastai'] = fastai_runner(train, valid)
    except ImportError as e: print(f"fastai not installed ({e}); skipping it", file=sys.stderr)
    for run in runners.values(): run()  # warm-up
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(repeats):
        # interleaved: every round times every variant once, the starting variant rotating from round to round (a
        # fixed order favoured one variant by ~10 us/batch over an identical copy of itself on this VM)
        for k in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            t0 = time.perf_counter(); runners[k](); times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, m in med.items():
        paired = statistics.median(t - p for t, p in zip(times[k], times['plain']))  # per-round difference to plain
        rows.append(dict(variant=k, ms_per_fit=m * 1e3, us_per_batch=m / batches * 1e6,
                         overhead_us_per_batch=paired / batches * 1e6, ratio_vs_plain=m / med['plain']))
    return rows


def memory(steps=20_000, every=2_000):
    "RSS growth of a long fit: no per-step tensor may stay alive."
    import psutil
    from channelslast_cb.core import Callback
    from channelslast_cb.learner import DataLoaders, Learner
    torch.set_num_threads(1)
    proc, samples = psutil.Process(), []

    class RSS(Callback):
        def after_batch(self):
            if self.learn.train_iter % every == 0: samples.append((self.learn.train_iter, proc.memory_info().rss))
    batch = make_batches(64)
    train = [batch[i % 64] for i in range(steps)]
    learn = Learner(DataLoaders(train), tiny_model(), loss_func=F.cross_entropy, cbs=RSS(), progress=False)
    learn.recorder.print_table = False
    learn.fit(1)
    return samples, len(learn.recorder.losses), type(learn.recorder.losses[0]).__name__


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=500, help='batches per timed fit')
    p.add_argument('--repeats', type=int, default=7, help='interleaved rounds; the median is reported')
    p.add_argument('--memory', type=int, default=0, metavar='STEPS', help='instead, report RSS growth over STEPS steps')
    p.add_argument('--baseline', metavar='CHECKOUT', help="also time the Learner of another checkout (e.g. the main "
                   "branch's), as variant 'baseline'")
    a = p.parse_args()
    if a.memory:
        samples, n, kind = memory(a.memory)
        base = samples[0][1]
        print(f"{n} losses recorded as {kind}; RSS by step (MiB, growth since step {samples[0][0]}):")
        for step, rss in samples: print(f"  step {step:>6}: {rss / 2**20:8.1f}  (+{(rss - base) / 2**20:.2f})")
        return
    rows = overhead(a.batches, a.repeats, a.baseline)
    print(f"{a.batches} batches of 8x3x4x4, 1 thread, median of {a.repeats} interleaved repeats "
          f"(torch {torch.__version__})")
    print(f"{'variant':<16}{'ms/fit':>10}{'us/batch':>10}{'overhead us/batch':>19}{'x plain':>9}")
    for r in rows:
        print(f"{r['variant']:<16}{r['ms_per_fit']:>10.1f}{r['us_per_batch']:>10.1f}{r['overhead_us_per_batch']:>19.1f}"
              f"{r['ratio_vs_plain']:>9.2f}")


if __name__ == '__main__': main()
