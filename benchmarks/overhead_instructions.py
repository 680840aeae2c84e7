"""CPU instructions per training batch that the Learner adds over a hand-written loop, counted by Valgrind's
callgrind: unlike `overhead.py`'s wall clock (which moves +-10 us between runs on a shared VM), the count is the
same from run to run within about 1%, so it can resolve changes of a few hundred nanoseconds.

    python benchmarks/overhead_instructions.py                         # plain loop vs the Learner (needs valgrind)
    python benchmarks/overhead_instructions.py --baseline <checkout>   # also another checkout's Learner

Same model, batches and loops as `overhead.py`. Each variant is warmed up, then `--fits` fits of `--batches` batches
are counted (only the code run inside them: Python's start-up and the warm-up are not instrumented). Overhead per
batch includes each fit's fixed cost spread over its batches, as in `overhead.py`. Takes ~1 min per variant.
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


def child(batches: int, fits: int, variants: list[str], baseline: str | None):
    "Runs under callgrind: warm up, switch instrumentation on, then one dump per variant"
    import torch
    sys.path.insert(0, str(HERE))
    import overhead as o
    torch.set_num_threads(1)
    train, valid = o.make_batches(batches), o.make_batches(1, seed=1)
    runners = {'plain': o.plain_runner(train, valid), 'channelslast_cb': o.ours_runner(train, valid)}
    if baseline: runners['baseline'] = o.ours_runner(train, valid, baseline)
    for run in runners.values(): run(); run()

    def control(*args):  # callgrind_control talks to this process; it answers only while this process runs code
        p = subprocess.Popen(['callgrind_control', *args, str(os.getpid())], stdout=subprocess.DEVNULL)
        while p.poll() is None: pass

    control('-i', 'on')
    for name in variants:
        # only what runs inside `exec` is counted (--toggle-collect=builtin_exec), not the busy waits above
        exec("for _ in range(fits): run()", {'run': runners[name], 'fits': fits})
        control('-d', name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=500, help='batches per fit')
    p.add_argument('--fits', type=int, default=4, help='fits counted per variant')
    p.add_argument('--baseline', metavar='CHECKOUT', help="also count another checkout's Learner, as variant 'baseline'")
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    variants = ['plain', 'channelslast_cb'] + (['baseline'] if a.baseline else [])
    if a.child: return child(a.batches, a.fits, variants, a.baseline)
    for tool in ('valgrind', 'callgrind_control'):
        if shutil.which(tool) is None: sys.exit(f"{tool} not found: install Valgrind (e.g. apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ['valgrind', '--tool=callgrind', '--instr-atstart=no', '--collect-atstart=no', '--toggle-collect=builtin_exec',
               f'--callgrind-out-file={tmp}/cg.%p', sys.executable, __file__, '--child', '--batches', str(a.batches),
               '--fits', str(a.fits)] + (['--baseline', a.baseline] if a.baseline else [])
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1'}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        counts = {}
        for f in Path(tmp).glob('cg.*.*'):  # one file per dump: `desc: Trigger: dump <variant>` and `totals: <n>`
            text = f.read_text()
            name, total = re.search(r'^desc: Trigger: dump (\S+)', text, re.M), re.search(r'^totals: (\d+)', text, re.M)
            if name and total: counts[name.group(1)] = int(total.group(1))
        if set(counts) != set(variants): sys.exit(f"callgrind run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    n = a.batches * a.fits
    print(f"{a.fits} fits of {a.batches} batches (8x3x4x4), 1 thread, counted by callgrind")
    print(f"{'variant':<16}{'instructions/batch':>20}{'overhead/batch':>16}{'x plain':>9}")
    for k in variants:
        print(f"{k:<16}{counts[k] / n:>20,.0f}{(counts[k] - counts['plain']) / n:>16,.0f}{counts[k] / counts['plain']:>9.3f}")


if __name__ == '__main__': main()
