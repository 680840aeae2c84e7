"""Elastic restarts with real processes: `torchrun --max-restarts`, a rank SIGKILLed mid-epoch, and the run that
`SaveModelCallback(autoresume=True)` resumes ending where the uninterrupted run ends.

`tests/elastic_worker.py` is the training script (first attempt and restarts alike); it also trains the uninterrupted
run, in the same process group, and writes what each rank ended with. `benchmarks/elastic_restarts.py` repeats the
restart many times (and a plain-torch script beside it); its counts are in BENCHMARKS.md.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / 'torchrun'
LAUNCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID',
               'TORCHELASTIC_RESTART_COUNT', 'TORCHELASTIC_USE_AGENT_STORE', 'GROUP_RANK')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(max_restarts: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    "`torchrun --nproc-per-node 2 --max-restarts N *args` from the repository root (static rendezvous, a free port)"
    exe = str(TORCHRUN) if TORCHRUN.exists() else shutil.which('torchrun')
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env['OMP_NUM_THREADS'] = '1'  # two ranks on a 2-core machine
    cmd = [exe, '--nproc-per-node', '2', '--max-restarts', str(max_restarts), '--master-addr', '127.0.0.1',
           '--master-port', str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(r: subprocess.CompletedProcess):
    assert r.returncode == 0, f"{' '.join(r.args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def ranks_ended_right(out: Path, restarts: int, resumed_from: str, n_kills: int):
    "Both ranks: the attempt `restarts` resumed from `resumed_from` and ended within 1e-6 of the uninterrupted run"
    assert sorted(p.name for p in out.glob('killed_*')) == [f'killed_{i}' for i in range(n_kills)]
    res = [torch.load(out / f'rank{r}.pt') for r in (0, 1)]
    for r in res:
        assert r['restart_count'] == restarts
        assert r['resumed_from'] == str(out / 'run' / 'models' / resumed_from)
        assert r['epochs_run'] == 4 - (int(resumed_from.split('_')[1].split('.')[0]) + 1)
        assert r['ref_resumed_from'] == 'None'  # the uninterrupted run started fresh
        assert max_diff(r['resumed'], r['reference']) <= 1e-6
    assert max_diff(res[0]['resumed'], res[1]['resumed']) == 0  # the ranks agree


def test_restart_after_sigkill_ends_as_the_uninterrupted_run(tmp_path):
    # rank 1 SIGKILLed after batch 1 of epoch 2 (of 4): torchrun restarts both, the group forms again, and the
    # fit continues from model_1 (the end of epoch 1), epoch 2's steps before the kill lost and redone
    r = torchrun(1, 'tests/elastic_worker.py', str(tmp_path), '1:2:1')
    check_ok(r)
    assert 'exitcode: -9' in r.stderr  # torchrun saw the SIGKILL
    assert r.stdout.count('autoresume: loaded') == 1, r.stdout  # rank 0 says it, once
    ranks_ended_right(tmp_path, restarts=1, resumed_from='model_1.pth', n_kills=1)


def test_a_second_failure_in_the_restarted_attempt(tmp_path):
    # rank 1 dies in epoch 1; the restarted attempt resumes from model_0, and its rank 0 (the one that leads the
    # group's formation) dies in epoch 2; the third attempt resumes from model_1 and ends right
    r = torchrun(2, 'tests/elastic_worker.py', str(tmp_path), '1:1:1', '0:2:2')
    check_ok(r)
    assert r.stderr.count('exitcode: -9') == 2, r.stderr
    assert [l.split('models/')[1] for l in r.stdout.splitlines() if l.startswith('autoresume: loaded')] == [
        'model_0.pth (the end of epoch 0); training epochs 1 to 3', 'model_1.pth (the end of epoch 1); training epochs 2 to 3']
    ranks_ended_right(tmp_path, restarts=2, resumed_from='model_1.pth', n_kills=2)


@pytest.mark.parametrize('absent, says', [
    (1, 'Rank(s) 1 of 2 did not join the process group within 5 s (timeout)'),
    (0, 'Rank 1: rank 0 did not answer within 5 s (timeout), so the process group could not form')])
def test_a_group_that_cannot_form_fails_within_the_timeout(tmp_path, absent, says):
    # one rank never reaches setup_distrib (it sleeps for 120 s): the other fails after its 5 s, with an error that
    # says who is missing, and torchrun then stops the sleeper; no restarts
    t = time.monotonic()
    r = torchrun(0, 'tests/elastic_worker.py', str(tmp_path), f'ABSENT={absent}', '5', timeout=100)
    assert r.returncode != 0
    assert says in r.stderr, r.stderr[-4000:]
    assert time.monotonic() - t < 100  # not the sleeper's 120 s, nor torch's 30 minutes


def test_example_script_survives_a_kill(tmp_path):
    # the command of the checkpoints guide, with the option that kills rank 1 in epoch 2
    r = torchrun(1, 'examples/elastic_digits.py', '--path', str(tmp_path), '--kill-rank1-in-epoch', '2')
    check_ok(r)
    out = r.stdout
    assert 'attempt 0 on 2 process(es)' in out and 'attempt 1 on 2 process(es)' in out, out
    assert f"autoresume: loaded {tmp_path / 'models' / 'model_1.pth'} (the end of epoch 1); training epochs 2 to 3" in out
    assert float(out.split('final validation accuracy:')[1]) > 0.9, out


def test_every_rank_resumes_from_rank0s_choice(tmp_path):
    # each rank has a checkpoint folder of its own, with different checkpoints (a folder the nodes do not share):
    # both ranks resume from the file rank 0 chose; and when rank 1 cannot load it, both ranks raise
    check_ok(torchrun(0, 'tests/elastic_agree_worker.py', str(tmp_path)))
    seen = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for s in seen:
        assert s['resumed_from'] == str(tmp_path / 'r0' / 'models' / 'model_1.pth')  # not rank 1's newer model_2
        assert s['epochs_run'] == 2
    assert 'holds the state of a AdamW optimizer, but this learner\'s is a SGD' in seen[1]['error']
    assert seen[0]['error'].startswith(f"RuntimeError: autoresume: loading {tmp_path / 'r0' / 'models' / 'model_3.pth'} "
                                       f"failed on rank(s) 1: CheckpointError: "), seen[0]['error']
