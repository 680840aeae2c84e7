"""Issue 23: the same decision on every run. Runs `--runs` fresh processes, each training a timm model with the
default `learn.to_channelslast()` for one short fit, and prints the setting each kept and what its own trial measured.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/decision_stability.py --cache off   # every run measures
    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/decision_stability.py --cache tmp   # one cache for all runs

With `--cache off` each process measures on its own: the count of distinct decisions is the stability of the rule
itself (its margin against near ties). With `--cache tmp` the first process measures and the others read it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter

RUN = r"""
import json, sys, warnings, torch, torch.nn.functional as F, timm
warnings.simplefilter('ignore')
from channelslast_cb.all import DataLoaders, Learner
name, size, bs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
x, y = torch.randn(bs * steps, 3, size, size), torch.randint(0, 10, (bs * steps,))
learn = Learner(DataLoaders.from_tensors((x, y), bs=bs), timm.create_model(name, num_classes=10), loss_func=F.cross_entropy,
                progress=False)
learn.recorder.print_table = False
learn.log = lambda m: None
learn.to_channelslast()
learn.fit(1)
d = learn.channels_last.decision
vs = {str(r['setting']): round(r['vs_kept'], 3) for r in d.table if r['timed']}
print(json.dumps(dict(kept=str(d.setting), source=d.source, steps=d.steps if d.source == 'measured' else 0, vs_kept=vs)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='resnet18')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--steps', type=int, default=50, help='steps of the fit: more than any trial takes')
    ap.add_argument('--runs', type=int, default=10)
    ap.add_argument('--cache', choices=('off', 'tmp'), default='off')
    a = ap.parse_args()
    cache = 'off' if a.cache == 'off' else tempfile.mkdtemp()
    out = []
    for i in range(a.runs):
        r = subprocess.run([sys.executable, '-c', RUN, a.model, str(a.size), str(a.bs), str(a.steps)], capture_output=True,
                           text=True, env={**os.environ, 'CHANNELSLAST_CB_CACHE': cache})
        if r.returncode: sys.exit(f"run {i} failed:\n{r.stderr[-2000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    print(f"{a.model}, {a.runs} fresh processes, cache {a.cache}: {dict(Counter(o['kept'] for o in out))}; "
          f"measuring steps {[o['steps'] for o in out]}")


if __name__ == '__main__':
    main()
