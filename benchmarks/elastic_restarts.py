"""How often a run survives a lost process under `torchrun --max-restarts 1`: ours against plain torch (issue 20).

    python benchmarks/elastic_restarts.py                          # 20 runs of each case below
    python benchmarks/elastic_restarts.py --n 5 --what ours --rdzv static nodes

Each run is one real launch with two processes on CPU (gloo), and one of them is SIGKILLed:

- `ours`: `tests/elastic_worker.py`, the channels-last learner with `SaveModelCallback(autoresume=True)` inside
  `learn.distrib_ctx()`, rank 1 killed after batch 1 of epoch 2 of 4. It counts as surviving when torchrun exits 0,
  the restarted attempt resumed from `model_1`, and both ranks end within 1e-6 of the uninterrupted run (which the
  worker trains afterwards in the same process group).
- `plain`: `benchmarks/elastic_plain.py`, torch alone (`init_process_group('gloo')`, `all_reduce`, rank 1 killed,
  `all_reduce`). It counts as surviving when torchrun exits 0 and both ranks finished.

Rendezvous (`--rdzv`): `static` (torchrun's default, `--master-addr/--master-port`), `standalone` (`--standalone`:
c10d on localhost), `nodes` (two torchrun agents of one process each, `--nnodes 2 --rdzv-backend c10d`, as two
machines would run; after the kill only the failed node's agent counts a restart, pytorch issue #108158, so the
two ranks see different `TORCHELASTIC_RESTART_COUNT`s). A launch that has not ended after `--limit` seconds is
killed and counted as a hang. Counts, not timings: the load of the machine does not change them.
"""
import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / 'torchrun'
LAUNCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID',
               'TORCHELASTIC_RESTART_COUNT', 'TORCHELASTIC_USE_AGENT_STORE', 'GROUP_RANK')
SCRIPTS = {'ours': ['tests/elastic_worker.py', '{out}', '1:2:1'], 'plain': ['benchmarks/elastic_plain.py', '{out}']}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launches(rdzv: str, script: list[str], i: int) -> list[list[str]]:
    "The torchrun command line(s) of one run"
    exe = str(TORCHRUN) if TORCHRUN.exists() else shutil.which('torchrun')
    base = [exe, '--max-restarts', '1']
    if rdzv == 'static': return [base + ['--nproc-per-node', '2', '--master-addr', '127.0.0.1', '--master-port', str(free_port()), *script]]
    if rdzv == 'standalone': return [base + ['--nproc-per-node', '2', '--standalone', *script]]
    if rdzv == 'nodes':
        ep = f'127.0.0.1:{free_port()}'
        return [base + ['--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint', ep,
                        '--rdzv-id', f'elastic-{os.getpid()}-{i}', *script]] * 2
    raise ValueError(f"rdzv {rdzv!r} is not one of 'static', 'standalone', 'nodes'")


def run_once(what: str, rdzv: str, i: int, limit: float) -> tuple[str, str]:
    "('ok' or why not, a note) for one launch"
    out = Path(tempfile.mkdtemp(prefix=f'elastic-{what}-{rdzv}-'))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env['OMP_NUM_THREADS'] = '1'
    script = [a.format(out=out) for a in SCRIPTS[what]]
    logs = [open(out / f'agent{j}.log', 'w+') for j in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[j], stderr=subprocess.STDOUT, start_new_session=True)
             for j, cmd in enumerate(launches(rdzv, script, i))]
    deadline, hung = time.monotonic() + limit, False
    for p in procs:
        try: p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired: hung = True
    for p in procs:  # a hung launch: its agent and workers, by process group (each launch has its own session)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = ''
    for f in logs: f.seek(0); text += f.read(); f.close()
    try: return judge(what, out, text, [p.returncode for p in procs], hung)
    finally: shutil.rmtree(out, ignore_errors=True)


def judge(what: str, out: Path, text: str, rcs: list[int], hung: bool) -> tuple[str, str]:
    if hung: return 'hung', ''
    if any(rcs):  # gloo's two ways of failing to form the restarted group (the first attempt's error is another)
        return next((w for w in ('Connection refused', 'Connect timeout') if w in text), f'failed (exit {rcs})'), ''
    if 'exitcode: -9' not in text: return 'no kill seen', ''  # not a restart: would not count either way
    if what == 'plain': return ('ok' if text.count(' done: 4') == 2 else 'ranks did not finish'), ''
    import torch
    res = [torch.load(out / f'rank{r}.pt') for r in (0, 1)]
    diff = max((r['resumed'][k].double() - r['reference'][k].double()).abs().max().item() for r in res for k in r['resumed'])
    resumed = {Path(r['resumed_from']).name for r in res}
    note = f"restart counts {sorted(r['restart_count'] for r in res)}, max diff {diff:g}"
    if resumed != {'model_1.pth'}: return f'resumed from {resumed}', note
    return ('ok' if diff <= 1e-6 else f'diff {diff:g}'), note


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=20, help='runs of each case')
    ap.add_argument('--what', nargs='+', default=['ours', 'plain'], choices=list(SCRIPTS))
    ap.add_argument('--rdzv', nargs='+', default=['static', 'standalone', 'nodes'], choices=['static', 'standalone', 'nodes'])
    ap.add_argument('--limit', type=float, default=180, help='seconds before a launch counts as hung')
    args = ap.parse_args()
    from channelslast_cb.bench import device_name
    print(f"{datetime.date.today()}, {device_name('cpu')}, {os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    import torch
    print(f"torch {torch.__version__}, gloo, 2 processes, torchrun --max-restarts 1, one process SIGKILLed", flush=True)
    rows = []
    for what in args.what:
        for rdzv in args.rdzv:
            outcomes, notes = Counter(), Counter()
            for i in range(args.n):
                how, note = run_once(what, rdzv, i, args.limit)
                outcomes[how] += 1
                if note: notes[note.split(', max')[0]] += 1
                print(f"  {what:<6}{rdzv:<11}run {i + 1:>2}: {how}{'  (' + note + ')' if note else ''}", flush=True)
            rows.append((what, rdzv, outcomes, notes))
    print('\n| script | rendezvous | survived | failures | the two ranks\' restart counts |\n|---|---|---|---|---|')
    for what, rdzv, outcomes, notes in rows:
        fails = ', '.join(f'{k} {v}' for k, v in outcomes.items() if k != 'ok') or '-'
        counts = ', '.join(f'{k.split(" ", 2)[2]} in {v}' for k, v in notes.items()) or '-'
        print(f"| {what} | {rdzv} | {outcomes['ok']}/{sum(outcomes.values())} | {fails} | {counts} |")


if __name__ == '__main__':
    main()
