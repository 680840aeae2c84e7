"""CPU instructions per training batch that `channelslast_cb.lightning.ChannelsLast` adds on Lightning's Trainer, over
the same conversion written by hand in the LightningModule, counted by Valgrind's callgrind: the wall clock of
`lightning_overhead.py` moves +-300 us per round on a shared 2-core VM, far more than the 10 us goal, while an
instruction count repeats within about 1%.

    python benchmarks/lightning_instructions.py          # needs valgrind; ~5-10 min

The variants are `lightning_overhead.py`'s (`by_hand`, `by_hand_empty_cb`, `callback`: same tiny model, same ready-made
batches). Each is warmed up, then fitted twice under instrumentation, with `--short` and with `--long` batches, each
fit on a new Trainer; the per-batch cost is the difference of the two counts over the difference in batches, so the
Trainer's set-up and each fit's fixed costs cancel. Reported: instructions per batch, and the difference to
`by_hand` (what the callback costs, Lightning's dispatch of its hooks included) and to `by_hand_empty_cb` (what our
code costs beyond what any Lightning callback pays).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ('by_hand', 'by_hand_empty_cb', 'callback')


def child(short: int, long: int):
    "Runs under callgrind: warm up, switch instrumentation on, then one dump per variant and fit length"
    import torch
    sys.path.insert(0, str(HERE))
    import lightning_overhead as lo
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(long)]
    for k in VARIANTS: lo.fit_once(k, batches[:20]); lo.fit_once(k, batches[:20])

    def control(*args):  # callgrind_control talks to this process; it answers only while this process runs code
        p = subprocess.Popen(['callgrind_control', *args, str(os.getpid())], stdout=subprocess.DEVNULL)
        while p.poll() is None: pass

    control('-i', 'on')
    for k in VARIANTS:
        for n in (short, long):  # only what runs inside `exec` is counted (--toggle-collect=builtin_exec)
            exec("fit(k, batches[:n])", {'fit': lo.fit_once, 'k': k, 'batches': batches, 'n': n})
            control('-d', f'{k}.{n}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--short', type=int, default=100, help='batches of the shorter fit')
    p.add_argument('--long', type=int, default=300, help='batches of the longer fit')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: return child(a.short, a.long)
    for tool in ('valgrind', 'callgrind_control'):
        if shutil.which(tool) is None: sys.exit(f"{tool} not found: install Valgrind (e.g. apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ['valgrind', '--tool=callgrind', '--instr-atstart=no', '--collect-atstart=no', '--toggle-collect=builtin_exec',
               f'--callgrind-out-file={tmp}/cg.%p', sys.executable, __file__, '--child', '--short', str(a.short),
               '--long', str(a.long)]
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1'}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        counts = {}
        for f in Path(tmp).glob('cg.*.*'):  # one file per dump: `desc: Trigger: dump <variant>.<n>` and `totals: <n>`
            text = f.read_text()
            name, total = re.search(r'^desc: Trigger: dump (\S+)', text, re.M), re.search(r'^totals: (\d+)', text, re.M)
            if name and total: counts[name.group(1)] = int(total.group(1))
        want = {f'{k}.{n}' for k in VARIANTS for n in (a.short, a.long)}
        if set(counts) != want: sys.exit(f"callgrind run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    per = {k: (counts[f'{k}.{a.long}'] - counts[f'{k}.{a.short}']) / (a.long - a.short) for k in VARIANTS}
    print(f"instructions per training batch on Lightning's Trainer (fits of {a.long} and {a.short} batches, 8x3x4x4, "
          f"1 thread, counted by callgrind)")
    for k in VARIANTS:
        print(f"  {k:<18}{per[k]:>14,.0f}   vs by_hand {per[k] - per['by_hand']:>+10,.0f}   "
              f"vs by_hand_empty_cb {per[k] - per['by_hand_empty_cb']:>+10,.0f}")


if __name__ == '__main__': main()
