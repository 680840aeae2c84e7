"""DDP with real `torch.distributed` processes: two ranks on CPU (gloo), started by `torchrun`.

`tests/ddp_worker.py` runs once for the module (one launch, several learners) and writes what each rank saw;
the tests compare the ranks. `test_example_script` runs the launch command shown in `nbs/06_distributed.ipynb`.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.distributed import DistributedTrainer
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / 'torchrun'
TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    "Run `torchrun --nproc_per_node 2 *args` from the repository root on a free local port"
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which('torchrun')
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env['OMP_NUM_THREADS'] = '1'  # two ranks on a 2-core machine
    cmd = [torchrun, '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(free_port()), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "What rank 0 and rank 1 of one `torchrun` launch of `ddp_worker.py` saw"
    out = tmp_path_factory.mktemp('ddp')
    torchrun('tests/ddp_worker.py', str(out))
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


def test_two_ranks(ranks):
    assert [r['world'] for r in ranks] == [2, 2]


def test_ranks_end_with_identical_weights(ranks):
    # the ranks start from different random weights (DDP copies rank 0's when it wraps) and train on different
    # batches; parameters and batch-norm buffers must be bit-identical after each fit
    for key in ('checksum', 'checksum2'):
        a, b = (r['tensor_batches'][key] for r in ranks)
        assert a == b, key
    for case in ('dataloader', 'one_valid_batch'):
        assert ranks[0][case]['checksum'] == ranks[1][case]['checksum'], case
    assert ranks[0]['tensor_batches']['checksum'] != ranks[0]['tensor_batches']['checksum2']  # the second fit trained


def test_model_is_channels_last_inside_ddp(ranks):
    for r in ranks:
        a = r['tensor_batches']
        assert a['wrapped'] == ['DistributedDataParallel']
        assert a['param_cl'] == [True] and a['xb_cl'] == [True]
        assert a['cl_after'] is True
        assert a['grad_warn'] == [] and a['grad_warn2'] == []  # DDP's buckets were built channels-last


def test_converting_after_the_wrap_breaks_ddp_buckets(ranks):
    # a model still NCHW when the fit starts: ChannelsLast (-1) converts it before DistributedTrainer (11) wraps it;
    # forced the other way round, DDP built its buckets for NCHW parameters that then became NHWC
    for r in ranks:
        assert r['late_right_order'] == dict(grad_warn=[], cl_after=True)
        assert r['wrong_order']['grad_warn'], "expected DDP's 'Grad strides do not match bucket view strides' warning"
        assert r['wrong_order']['cl_after'] is True


def test_each_rank_trains_on_its_half(ranks):
    for case, n, n_epoch in (('tensor_batches', 64, 2), ('dataloader', 48, 2)):
        keys = ranks[0][case]['train_keys']
        assert len(set(keys)) == n
        epochs = [r[case]['items'] for r in ranks]
        assert [len(e) for e in epochs] == [n_epoch, n_epoch]
        for ep in range(n_epoch):
            a, b = epochs[0][ep], epochs[1][ep]
            assert len(a) == len(b) == n // 2, case
            assert not set(a) & set(b), f'{case}: the ranks shared items in epoch {ep}'
            assert sorted(a + b) == sorted(keys), case
        assert epochs[0][0] != epochs[0][1], f'{case}: the second epoch was not reshuffled'


def test_validation_is_the_whole_set_on_every_rank(ranks):
    for case in ('tensor_batches', 'dataloader', 'one_valid_batch'):
        t0, t1 = (r[case]['table'] for r in ranks)
        assert t0 == t1, case  # the whole table, training loss included, is the same on both ranks
        last = t0[-1]
        for r in ranks:
            # equal to one process validating the whole validation set with the final model
            single = r[case]['validate_single']
            assert last['valid_loss'] == pytest.approx(single[0], rel=1e-5, abs=1e-6), case
            assert last['accuracy'] == pytest.approx(single[1], abs=1e-6), case
    for r in ranks:
        a = r['tensor_batches']
        assert a['validate'] == pytest.approx(a['validate_single'], rel=1e-5, abs=1e-6)  # learn.validate() with DDP
        assert a['n_preds'] == 40  # get_preds: the whole set on every rank


def test_learner_is_unwrapped_after_fit(ranks):
    for r in ranks:
        a = r['tensor_batches']
        assert a['model_after'] == a['model_after2'] == 'Sequential'
        assert a['dls_after'] is True
        assert a['trainer_after_ctx'] is False
        assert a['group_after_ctx'] is True  # the worker set the group up itself: distrib_ctx must leave it


def test_only_rank0_prints(ranks):
    for case in ('tensor_batches', 'dataloader'):
        assert 'valid_loss' in ranks[0][case]['printed']
        assert ranks[1][case]['printed'] == ''


def test_example_script():
    # the command shown in nbs/06_distributed.ipynb: `torchrun --nproc_per_node 2 examples/ddp_digits.py`
    r = torchrun('examples/ddp_digits.py')
    out = r.stdout
    assert out.count('train_loss') == 1, out  # one table: rank 0's
    assert out.count('on 2 process(es), 32 images each per step') == 1, out
    lines = [l for l in out.splitlines() if l.startswith('final validation accuracy:')]
    assert len(lines) == 1, out
    assert float(lines[0].split(':')[1]) > 0.7, out


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in TORCHRUN_VARS: monkeypatch.delenv(k, raising=False)


def small_learner():
    return Learner(DataLoaders.from_tensors(synth_images(16), bs=8), tiny_cnn(), loss_func=F.cross_entropy, progress=False)


def test_ddp_without_a_launch_says_how_to_launch(no_torchrun):
    learn = small_learner()
    with pytest.raises(RuntimeError, match=r'not started by torchrun.*torchrun --nproc_per_node 2'):
        learn.to_distributed()
    with pytest.raises(RuntimeError, match=r'DistributedTrainer needs a torch.distributed process group.*torchrun'):
        learn.fit(1, cbs=DistributedTrainer())
    assert type(learn.model) is nn.Sequential and not any(isinstance(c, DistributedTrainer) for c in learn.cbs)
    with pytest.raises(TypeError, match="'bucket_cap', which DistributedDataParallel does not take"):
        DistributedTrainer(bucket_cap=25)


def test_distrib_ctx_outside_a_launch_trains_here_and_warns(no_torchrun):
    learn = small_learner()
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.warns(UserWarning, match='trains in this single process, without DDP'):
        with learn.distrib_ctx(): learn.fit(1)
    assert any(not torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    assert type(learn.model) is nn.Sequential


def test_fp16_ranks_skip_the_same_steps(ranks):
    # ChannelsLast + MixedPrecision('fp16', a first scale that overflows) + DDP: DDP averages the scaled gradients,
    # so every rank's GradScaler finds the same overflow, skips the same steps and backs off to the same scale
    a, b = (r['fp16'] for r in ranks)
    assert a['skipped'] > 0
    assert (a['skipped'], a['scale'], a['checksum'], a['table']) == (b['skipped'], b['scale'], b['checksum'], b['table'])
    assert a['grad_warn'] == [] and a['cl_after'] is True


def test_every_torchrun_worker_ends_through_exit_worker():
    "A worker that lets Python finalize after DDP on gloo can abort at exit (SIGABRT): `helpers.exit_worker` says why"
    workers = [f for f in sorted(Path(__file__).parent.glob('*_worker.py'))
               if any(s in f.read_text() for s in ('distrib_ctx', 'DDPStrategy', 'setup_distrib'))]
    assert len(workers) >= 9, [f.name for f in workers]
    for f in workers: assert 'exit_worker()' in f.read_text(), f"{f.name} ends without exit_worker()"
