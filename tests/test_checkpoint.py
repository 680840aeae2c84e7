"""Checkpoints (issue 13): atomic saves under SIGKILL, bad-file errors, loads that change nothing when they fail, exact
resume in a fresh process, `SaveModelCallback`/`EarlyStoppingCallback`, portability, and rank-0-only writes under DDP.

The subprocess scripts: `ckpt_saver.py` (saves a 100 MB model in a loop), `ckpt_resume_worker.py` (full run, then a
resume in another process), `ddp_ckpt_worker.py` (two torchrun ranks).
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.checkpoint import EarlyStoppingCallback, SaveModelCallback
from channelslast_cb.checkpoint_io import CheckpointError, read_checkpoint, stale_temp_files
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner, accuracy
from channelslast_cb.optimizer import TorchOpt
from helpers import synth_images, tiny_cnn

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CL = torch.channels_last
pytestmark = pytest.mark.filterwarnings('ignore:fp16 mixed precision on this CPU computes in real float16')


def env():
    e = {**os.environ, 'OMP_NUM_THREADS': '1'}
    e['PYTHONPATH'] = os.pathsep.join([str(ROOT), str(TESTS), e.get('PYTHONPATH', '')])
    return e


def make(path, model=None, cbs=None, **kw):
    dls = DataLoaders.from_tensors(synth_images(32), valid=synth_images(16, seed=1), bs=8)
    return Learner(dls, model or tiny_cnn(), loss_func=F.cross_entropy, metrics=accuracy, lr=1e-2, path=path,
                   cbs=cbs, progress=False, **kw)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def temps(folder): return sorted(p.name for p in Path(folder).glob('.*.tmp-*'))


# --- SIGKILL during save -------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.name != 'posix', reason='SIGKILL and the stale-temp owner check are POSIX')
def test_sigkill_during_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    "Kill a process saving a 100 MB model at varied moments of a save: the file is always whole, the old or the new one"
    ckpt = tmp_path / 'models' / 'big.pth'
    outcomes = []
    for frac in (0.05, 0.4, 0.8, 1.3):  # moments, as fractions of the first save's duration, after `saving 2`
        proc = subprocess.Popen([sys.executable, str(TESTS / 'ckpt_saver.py'), str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, env=env(), cwd=ROOT)
        lines = []
        try:
            while not lines or not lines[-1].startswith('saving 2'):
                line = proc.stdout.readline()
                assert line, f"the saver ended early: {lines}"
                lines.append(line.strip())
            first = float(next(l for l in lines if l.startswith('saved 1')).split()[2])
            time.sleep(frac * first)
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=30)
        lines += rest.splitlines()
        assert proc.returncode == -signal.SIGKILL
        saved = max(int(l.split()[1]) for l in lines if l.startswith("saved"))
        state = read_checkpoint(ckpt)  # raises CheckpointError for a cut-off file
        w = state['model']['weight']
        v = w[0, 0].item()
        assert v in (saved, saved + 1), (v, saved)  # the last completed save, or the one that was running
        assert w.shape == (5000, 5000) and bool((w == v).all()) and bool((state['model']['bias'] == v).all())
        assert len(temps(ckpt.parent)) <= 1  # at most the one the kill interrupted: the next save removes it
        outcomes.append((frac, v - saved))
    # the next save removes the killed save's temporary file
    learn = Learner(DataLoaders([(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))]), nn.Linear(3, 2),
                    loss_func=F.cross_entropy, path=tmp_path, progress=False)
    learn.save('big')
    assert temps(ckpt.parent) == [] and stale_temp_files(ckpt) == []
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ['big.pth']
    print('kill moments (fraction of a save, new file?):', outcomes)


# --- bad files -----------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    learn = make(tmp_path)
    learn.fit(1)
    return learn, learn.save('good')


@pytest.mark.parametrize('kind, why', [
    ('empty', 'it is empty (0 bytes)'), ('truncated', 'it is truncated'), ('half', 'it is truncated'),
    ('random', 'it is not a PyTorch file'), ('foreign', 'holds a pickled `pathlib'),
    ('not_a_checkpoint', 'holds a list, not a checkpoint')])
def test_bad_file_errors_name_the_file(saved, kind, why):
    learn, good = saved
    bad = good.with_name('bad.pth')
    data = good.read_bytes()
    if kind == 'empty': bad.write_bytes(b'')
    elif kind == 'truncated': bad.write_bytes(data[:len(data) - 100])
    elif kind == 'half': bad.write_bytes(data[:len(data) // 2])
    elif kind == 'random': bad.write_bytes(os.urandom(4096).replace(b'PK', b'QK').lstrip(b'\x80') or b'x')
    elif kind == 'foreign': torch.save({'model': learn.model.state_dict(), 'where': Path('/tmp')}, bad)
    else: torch.save([1, 2, 3], bad)
    before = [w.clone() for w in learn.model.parameters()]
    with pytest.raises(CheckpointError) as e: learn.load('bad')
    msg = str(e.value)
    assert str(bad) in msg and why in msg
    assert 'weights_only=False' not in msg and e.value.__cause__ is None  # torch's advice is neither said nor chained
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_missing_file(saved):
    learn, good = saved
    with pytest.raises(FileNotFoundError, match=f"No checkpoint at {good.with_name('nope.pth')}"): learn.load('nope')


def test_names_follow_fastai_with_dots_kept(tmp_path):
    learn = make(tmp_path)
    assert learn.save('resnet_v1.5') == tmp_path / 'models' / 'resnet_v1.5.pth'
    assert learn.save('b.pth') == tmp_path / 'models' / 'b.pth'
    assert learn.save(Path('runs') / 'c') == tmp_path / 'models' / 'runs' / 'c.pth'
    absolute = tmp_path / 'elsewhere' / 'd'
    assert learn.save(absolute) == absolute.with_name('d.pth') and learn.save(str(absolute)) == absolute.with_name('d.pth')
    for name in ('resnet_v1.5', 'b.pth', 'b', Path('runs') / 'c', absolute): make(tmp_path).load(name, with_opt=False)
    assert not Path('resnet_v1.5').exists()
    with pytest.raises(TypeError, match='file must be a checkpoint name'): learn.save(42)


# --- a load that fails changes nothing ------------------------------------------------------------------------------

class Stateful(Callback):
    "A callback with state, whose load refuses a negative count"
    order = 70  # after everything: only its state matters here
    def __init__(self, n=0): super().__init__(); self.n = n
    def state_dict(self): return {'n': self.n}
    def load_state_dict(self, st):
        if st['n'] < 0: raise ValueError(f"n must be >= 0, got {st['n']}")
        self.n = st['n']


def snapshot(learn):
    return ([w.clone() for w in learn.model.state_dict().values()],
            {k: {n: v.clone() for n, v in s.items()} for k, s in learn.opt.state_dict()['state'].items()},
            learn.mixed_precision.scaler.get_scale(), learn.stateful.n, learn.epoch)


def assert_unchanged(learn, snap):
    w, opt, scale, n, epoch = snapshot(learn)
    assert all(torch.equal(a, b) for a, b in zip(w, snap[0]))
    assert opt.keys() == snap[1].keys() and all(torch.equal(opt[k][n], snap[1][k][n]) for k in opt for n in opt[k])
    assert (scale, n, epoch) == snap[2:]


@pytest.mark.parametrize('fault', ['cb_state', 'opt_groups', 'shape', 'opt_type'])
def test_failed_load_changes_nothing(tmp_path, fault):
    src = make(tmp_path, model=tiny_cnn(seed=1), cbs=[MixedPrecision('fp16', init_scale=2.**10), Stateful(5)])
    m = src.model
    if fault == 'cb_state': src.stateful.n = -1
    if fault == 'opt_groups': src.opt = TorchOpt(torch.optim.AdamW([{'params': m[:2].parameters()}, {'params': m[2:].parameters()}]))
    if fault == 'shape': m[-1] = nn.Linear(8, 3)
    if fault == 'opt_type': src.opt = TorchOpt(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    src.fit(1)  # the optimizer state exists (and the scale differs from the target's)
    src.save('src')
    dst = make(tmp_path, cbs=[MixedPrecision('fp16'), Stateful(3)])
    dst.fit(1)
    snap = snapshot(dst)
    expected = {'cb_state': 'Stateful cannot take its saved state', 'opt_groups': 'has 2 optimizer parameter group(s)',
                'shape': "'7.weight' is (3, 8) in the file but (2, 8) in the model", 'opt_type': 'state of a SGD optimizer'}
    with pytest.raises(CheckpointError, match=expected[fault].replace('(', r'\(').replace(')', r'\)')): dst.load('src')
    assert_unchanged(dst, snap)
    if fault == 'shape':
        with pytest.raises(CheckpointError, match='is \\(3, 8\\) in the file'): dst.load('src', strict=False)
        assert_unchanged(dst, snap)


def test_load_into_a_learner_without_optimizer_keeps_none_when_it_fails(tmp_path):
    src = make(tmp_path)
    src.opt = TorchOpt(torch.optim.AdamW([{'params': src.model[:2].parameters()}, {'params': src.model[2:].parameters()}]))
    src.fit(1)
    src.save('two')
    dst = make(tmp_path)
    with pytest.raises(CheckpointError): dst.load('two')
    assert dst.opt is None
    dst.load('two', with_opt=False)  # the weights alone fit
    assert same_weights(src, dst) and dst.opt is None


def test_model_only_checkpoint_warns_when_asked_for_the_optimizer(tmp_path):
    src = make(tmp_path)
    src.fit(1)
    src.save('w', with_opt=False)
    assert set(read_checkpoint(src.path / 'models' / 'w.pth')) == {'model'}
    with pytest.warns(UserWarning, match='holds no optimizer state'): make(tmp_path).load('w')
    torch.save(src.model.state_dict(), tmp_path / 'bare.pth')  # a plain state_dict file loads as weights
    assert same_weights(src, make(tmp_path).load(tmp_path / 'bare.pth', with_opt=False))


# --- portability ---------------------------------------------------------------------------------------------------

def layouts(model): return {p.is_contiguous(memory_format=CL) and not p.is_contiguous() for p in model.parameters() if p.dim() == 4}


@pytest.mark.parametrize('src_cfg, dst_cfg', [('cl_fp16', 'plain'), ('plain', 'cl_fp16'), ('cl_bf16', 'plain_fp16')])
def test_checkpoints_are_portable_across_layout_and_precision(tmp_path, src_cfg, dst_cfg):
    def build(cfg, seed):
        cbs = ([ChannelsLast()] if cfg.startswith('cl') else []) + \
              ([MixedPrecision('fp16', init_scale=2.**9)] if cfg.endswith('fp16') else []) + \
              ([MixedPrecision('bf16')] if cfg.endswith('bf16') else [])
        return make(tmp_path, model=tiny_cnn(seed=seed), cbs=cbs)
    src = build(src_cfg, 1)
    src.fit(1)
    p = src.save('x')
    assert all(t.is_contiguous() for t in read_checkpoint(p)['model'].values())
    assert all(t.is_contiguous() for s in read_checkpoint(p)['opt']['state'].values() for t in s.values())
    dst = build(dst_cfg, 2)
    dst.load('x')
    assert same_weights(src, dst)
    assert layouts(dst.model) == {dst_cfg.startswith('cl')}  # the target keeps its own layout
    if src_cfg.endswith('fp16') and dst_cfg.endswith('fp16'):
        assert dst.mixed_precision.scaler.get_scale() == src.mixed_precision.scaler.get_scale()
    dst.fit(1)  # and trains on
    assert layouts(dst.model) == {dst_cfg.startswith('cl')}


# --- exact resume in a fresh process --------------------------------------------------------------------------------

def test_resume_in_a_fresh_process_ends_with_the_same_weights(tmp_path):
    for mode in ('full', 'resume'):
        r = subprocess.run([sys.executable, str(TESTS / 'ckpt_resume_worker.py'), mode, str(tmp_path)], cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == \
        [f'{c}_{e}.pth' for c in ('cl_bf16', 'fp32') for e in range(4)]
    for cfg in ('fp32', 'cl_bf16'):
        full, resumed, reseeded = (torch.load(tmp_path / f'{cfg}_{k}.pt') for k in ('full', 'resumed', 'reseeded'))
        for k in full: torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=f'{cfg} {k}')
        # the control: the same resume with the generators reseeded after the load ends elsewhere
        assert max((reseeded[k] - full[k]).abs().max().item() for k in full) > 1e-4, cfg


# --- callbacks ------------------------------------------------------------------------------------------------------

def test_save_model_callback_best_valid_loss_and_not_in_validate(tmp_path):
    learn = make(tmp_path, cbs=SaveModelCallback(with_opt=True))
    learn.fit(3)
    losses = [learn.recorder.values[i][learn.recorder.metric_names[1:].index('valid_loss')] for i in range(3)]
    best = losses.index(min(losses))
    state = read_checkpoint(tmp_path / 'models' / 'model.pth')
    assert state['epoch'] == best and learn.epoch == best
    assert all(torch.equal(a, b) for a, b in zip(state['model'].values(), learn.model.state_dict().values()))
    (tmp_path / 'models' / 'model.pth').unlink()
    learn.validate(); learn.get_preds()
    assert not (tmp_path / 'models' / 'model.pth').exists()  # validate/get_preds do not save


def test_early_stopping_stops(tmp_path):
    learn = make(tmp_path, cbs=EarlyStoppingCallback(monitor='train_loss', min_delta=10., patience=2))
    learn.fit(10)  # a loss never drops by 10: epochs 1 and 2 do not improve on epoch 0
    assert len(learn.recorder.values) == 3 and learn.epoch == 2
    with pytest.raises(ValueError, match="monitor='valid_loss' is measured on the validation set, and there is none"):
        Learner(DataLoaders.from_tensors(synth_images(16), bs=8), tiny_cnn(), loss_func=F.cross_entropy,
                cbs=EarlyStoppingCallback(), progress=False).fit(1)


# --- DDP: only rank 0 writes ----------------------------------------------------------------------------------------

def file_checksum(p) -> str:
    h = hashlib.sha256()
    for k, v in read_checkpoint(p)['model'].items(): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_ddp_only_rank0_writes(tmp_path):
    from test_distributed import torchrun
    (tmp_path / 'blocked').write_text('a file where a folder should be: rank 0 cannot save under it')
    torchrun('tests/ddp_ckpt_worker.py', str(tmp_path))
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert sorted(p.name for p in (tmp_path / 'rank0' / 'models').iterdir()) == ['model_0.pth', 'model_1.pth']
    assert not (tmp_path / 'rank1').exists()  # rank 1 returned without writing (not even the folder)
    shared = tmp_path / 'shared' / 'models'
    assert sorted(p.name for p in shared.iterdir()) == ['model.pth']  # no temporary files either
    assert ranks[0]['shared']['checksum'] == ranks[1]['shared']['checksum'] == file_checksum(shared / 'model.pth')
    assert ranks[0]['shared']['saved'] == ranks[1]['shared']['saved'] == str(shared / 'model.pth')
    # a failed write on rank 0 raises on every rank (rank 1 learns it from rank 0) instead of leaving rank 1 waiting
    assert 'FileExistsError' in ranks[0]['blocked'] or 'NotADirectoryError' in ranks[0]['blocked'], ranks[0]['blocked']
    assert 'Rank 0 failed to write the checkpoint' in ranks[1]['blocked'], ranks[1]['blocked']


def test_ddp_resume_ends_with_the_same_weights(tmp_path):
    "A DDP run resumed with `start_epoch` shuffles its epochs as the uninterrupted run did, so it ends at the same weights"
    from test_distributed import torchrun
    torchrun('tests/ddp_resume_worker.py', str(tmp_path))
    runs = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    for r, run in enumerate(runs):
        for k, v in run['full'].items():
            torch.testing.assert_close(run['resumed'][k], v, rtol=0, atol=1e-6, msg=f'rank {r} {k}')
            torch.testing.assert_close(runs[1]['full'][k], runs[0]['full'][k], rtol=0, atol=0)  # DDP: ranks agree


def test_weights_only_false_is_accepted_and_changes_nothing(saved):
    learn, good = saved
    assert learn.load('good', weights_only=False) is learn  # fastai's SaveModelCallback passes it
    bad = good.with_name('bad.pth')
    torch.save({'model': learn.model.state_dict(), 'where': Path('/tmp')}, bad)
    with pytest.raises(CheckpointError, match='holds a pickled `pathlib'): learn.load('bad', weights_only=False)
