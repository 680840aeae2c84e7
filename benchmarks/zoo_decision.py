"""Issue 23's zoo: for each model, the plain PyTorch loops in {contiguous, channels-last} x {fp32, bf16, fp16} side by
side (one process, interleaved rounds, paired per-round medians), then what this library decides on the same model:
the default `learn.to_channelslast()` and `to_channelslast(auto=True)`, each on a fresh decision cache, and the
default again on a second model instance (a cache hit).

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/zoo_decision.py --out benchmarks/results/zoo_decision.md

What each column means:
- `best plain CL` / `best plain`: the plain channels-last setting (all settings) with the lowest median step;
- `default` / `auto=True`: the setting each kept, and its plain step time over the best plain channels-last setting
  (default: the card promises channels-last) or over the best plain setting of all (`auto=True`), both read off the
  interleaved plain table, so the comparison is between settings measured side by side;
- `steps`: the measuring steps the decision took; `extra`: what the first fit's steps up to the decision cost over
  as many steps of the best setting, in steps of it (the first fit's own steps, timed one by one, against the best
  plain setting's median; a first fit's cold start counts in it, as it would for a hand-written loop);
- `hit`: the steps the second instance measured (0 on a cache hit).

No test reads these figures: a timing decides nothing but the table.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from channelslast_cb.all import ChannelsLast, DataLoaders, Learner, MixedPrecision, Callback
from channelslast_cb.bench import device_name

CL = torch.channels_last
SETTINGS = [(l, p) for p in ('fp32', 'bf16', 'fp16') for l in ('contiguous', 'channels_last')]
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
MODELS = ['resnet18', 'efficientnet_b0', 'mobilenetv3_large_100', 'tv:densenet121', 'convnext_atto',
          'vit_tiny_patch16_224', 'tv:shufflenet_v2_x1_0', 'smp:Unet-resnet18']


def build(name: str, size: int):
    "A randomly initialised model (seeded: every variant starts from the same weights) and whether it segments"
    torch.manual_seed(0)
    if name.startswith('tv:'):
        import torchvision
        return getattr(torchvision.models, name[3:])(weights=None, num_classes=10), False
    if name.startswith('smp:'):
        import segmentation_models_pytorch as smp
        arch, enc = name[4:].split('-')
        return getattr(smp, arch)(enc, encoder_weights=None, classes=2), True
    import timm
    kw = dict(img_size=size) if name.startswith('vit') else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kw), False


def batch(size: int, bs: int, seg: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bs, 3, size, size, generator=g)
    y = torch.randint(0, 2 if seg else 10, (bs, size, size) if seg else (bs,), generator=g)
    return x, y


def plain_step(model, opt, x, y, layout, precision):
    "One hand-written training step: the batch in `layout`, the forward under autocast in `precision`"
    xb = x.contiguous(memory_format=CL) if layout == 'channels_last' else x
    ctx = torch.autocast('cpu', dtype=DTYPES[precision]) if precision != 'fp32' else torch.autocast('cpu', enabled=False)
    with ctx: out = model(xb)
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def plain_table(name, size, bs, rounds, block):
    "Median step (s) per setting, and per round each setting's block median: interleaved, so drift is shared"
    x, y = batch(size, bs, build(name, size)[1])
    runs = {}
    for s in SETTINGS:
        m, _ = build(name, size)
        if s[0] == 'channels_last': m = m.to(memory_format=CL)
        runs[s] = (m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=.9))
        for _ in range(2): plain_step(*runs[s], x, y, *s)  # warm-up: kernels, caches
    per_round = []
    for r in range(rounds):
        order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
        times = {}
        for s in order:
            ts = []
            for _ in range(block):
                t = time.perf_counter(); plain_step(*runs[s], x, y, *s); ts.append(time.perf_counter() - t)
            times[s] = statistics.median(ts)
        per_round.append(times)
    return per_round


def ratio(per_round, s, ref): return statistics.median(r[s] / r[ref] for r in per_round)


class StepTimes(Callback):
    "Every training step's wall time, from before_batch to after_step"
    order = -20
    def __init__(self): self.times, self._t = [], None
    def before_batch(self):
        if self.learn.training: self._t = time.perf_counter()
    def after_step(self):
        if self._t is not None: self.times.append(time.perf_counter() - self._t); self._t = None


def decide_fit(name, size, bs, steps, auto: bool):
    "A first fit of `steps` steps with the default call (or auto=True); the decision and each step's time"
    model, seg = build(name, size)
    x, y = batch(size, bs, seg)
    dls = DataLoaders.from_tensors((x.repeat(steps, 1, 1, 1), y.repeat(steps, *([1] * (y.dim() - 1)))), bs=bs, shuffle=False)
    learn = Learner(dls, model, loss_func=lambda out, t: F.cross_entropy(out.float(), t), progress=False,
                    opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=.9), lr=1e-3)
    learn.recorder.print_table = False
    learn.log = lambda m: None
    learn.to_channelslast(auto=auto)
    learn.add_cb(st := StepTimes())
    learn.fit(1)
    return learn.channels_last.decision, st.times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', nargs='+', default=MODELS)
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--block', type=int, default=2)
    ap.add_argument('--steps', type=int, default=48, help="steps of each decision fit (more than any trial takes)")
    ap.add_argument('--out', default=None, help="write the Markdown table (and a .json beside it) here")
    a = ap.parse_args()
    warnings.simplefilter('ignore')
    rows = []
    for name in a.models:
        t0 = time.time()
        per_round = plain_table(name, a.size, a.bs, a.rounds, a.block)
        ref = ('channels_last', 'fp32')
        rel = {s: ratio(per_round, s, ref) for s in SETTINGS}
        best_cl = min((s for s in SETTINGS if s[0] == 'channels_last'), key=rel.get)
        best = min(SETTINGS, key=rel.get)
        ms = {s: statistics.median(r[s] for r in per_round) * 1e3 for s in SETTINGS}
        row = dict(model=name, ms={f'{l}/{p}': round(v, 1) for (l, p), v in ms.items()},
                   best_cl=f'{best_cl[0]}/{best_cl[1]}', best=f'{best[0]}/{best[1]}')
        with tempfile.TemporaryDirectory() as cache:
            os.environ['CHANNELSLAST_CB_CACHE'] = cache
            for key, auto, against in (('default', False, best_cl), ('auto', True, best)):
                d, times = decide_fit(name, a.size, a.bs, a.steps, auto)
                if d is None: sys.exit(f"{name}: no decision within {a.steps} steps; pass a larger --steps")
                kept = (d.layout, d.precision)
                n = d.steps
                extra = (sum(times[:n]) - n * statistics.median(r[against] for r in per_round)) / statistics.median(r[against] for r in per_round)
                row[key] = dict(kept=f'{kept[0]}/{kept[1]}', vs_best=round(rel[kept] / rel[against], 3), steps=n,
                                extra_steps=round(extra, 1), table=str(d))
            d, _ = decide_fit(name, a.size, a.bs, 4, False)  # a second instance: the cache answers
            row['hit'] = dict(source=d.source, steps=d.steps if d.source == 'measured' else 0)
        row['seconds'] = round(time.time() - t0)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    head = (f"CPU: {device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{datetime.date.today()}, load average {load:.1f} at the end; {a.size} px, batch {a.bs}, "
            f"{a.rounds} rounds x {a.block} steps per plain setting")
    lines = [head, '', '| model | plain step ms: CL fp32 / bf16 / fp16 | best plain CL | best plain | default keeps (x best CL) | steps / extra | auto=True keeps (x best) | steps / extra | cache hit steps |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        m = r['ms']
        lines.append(f"| {r['model']} | {m['channels_last/fp32']} / {m['channels_last/bf16']} / {m['channels_last/fp16']} "
                     f"| {r['best_cl']} | {r['best']} | {r['default']['kept']} ({r['default']['vs_best']:.2f}x) "
                     f"| {r['default']['steps']} / {r['default']['extra_steps']} | {r['auto']['kept']} ({r['auto']['vs_best']:.2f}x) "
                     f"| {r['auto']['steps']} / {r['auto']['extra_steps']} | {r['hit']['steps']} ({r['hit']['source']}) |")
    text = '\n'.join(lines)
    print(text)
    if a.out:
        with open(a.out, 'w') as f: f.write(text + '\n')
        with open(os.path.splitext(a.out)[0] + '.json', 'w') as f: json.dump(dict(head=head, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
