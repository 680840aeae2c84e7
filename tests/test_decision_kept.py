"""Issue 23: a decision is kept. On disk across fresh processes (the same decision every run, no measuring step on a
hit, the cache's faults survived), in our checkpoints (a resumed run trains in it without measuring), and in a fastai
export loaded in a process that imported only fastai (it trains in the precision it names)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import channelslast_cb.channelslast  # noqa: F401 (Learner.to_channelslast)
import channelslast_cb.decide as decide
import channelslast_cb.fp16 as fp16
from channelslast_cb.autotune import AutoDecision, Setting
from channelslast_cb.fp16 import AMPMode, AMPSpeed
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn_no_conv_bias

ROOT = Path(__file__).parents[1]
BF16_FAST = {('cpu', AMPMode.BF16): AMPSpeed('cpu', AMPMode.BF16, .8), ('cpu', AMPMode.FP16): AMPSpeed('cpu', AMPMode.FP16, 5.)}


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    "Run `code` in a fresh Python process from the repository root (tests/ on its path)"
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env}, timeout=300)
    assert r.returncode == 0, f"the subprocess failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# a fresh process: the default call on the tiny CNN with a fake step clock (bf16 steps cost 60% of fp32's); prints
# the decision as JSON. The clock is per process, so a second process that reads a cached decision never uses it.
FIT = """
import json, torch, torch.nn.functional as F
import channelslast_cb.channelslast  # Learner.to_channelslast
import channelslast_cb.fp16 as fp16
from channelslast_cb.fp16 import AMPMode, AMPSpeed
from channelslast_cb.learner import DataLoaders, Learner
from helpers import synth_images, tiny_cnn_no_conv_bias
fp16.AMP_SPEEDS.update({('cpu', AMPMode.BF16): AMPSpeed('cpu', AMPMode.BF16, .8), ('cpu', AMPMode.FP16): AMPSpeed('cpu', AMPMode.FP16, 5.)})
learn = Learner(DataLoaders.from_tensors(synth_images(8 * 30), bs=8), tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, progress=False)
learn.recorder.print_table = False
learn.to_channelslast()
cb, mp, t = learn.channels_last, learn.mixed_precision, [0.]
def clock():
    t[0] += (.006 if mp.precision == 'bf16' else .010) * (1.05 if cb.layout == 'contiguous' else 1.) / 2
    return t[0]
cb._clock = clock
seen = []
learn.model[0].register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)) if m.training else None)
learn.fit(1)
d = cb.decision
print(json.dumps(dict(setting=str(d.setting), source=d.source, steps=d.steps if d.source == 'measured' else 0, first=seen[0])))
"""


def test_fresh_processes_keep_one_decision_and_measure_once(tmp_path):
    env = dict(CHANNELSLAST_CB_CACHE=str(tmp_path))
    runs = [json.loads(run_py(FIT, **env).stdout.strip().splitlines()[-1]) for _ in range(3)]
    assert {r['setting'] for r in runs} == {'channels_last/bf16'}, runs
    assert runs[0]['source'] == 'measured' and runs[0]['steps'] > 0 and runs[0]['first'] == 'torch.float32'
    assert [(r['source'], r['steps'], r['first']) for r in runs[1:]] == [('cached', 0, 'torch.bfloat16')] * 2, runs
    assert len(list(tmp_path.glob('*.json'))) == 1


def test_cache_faults_are_survived(tmp_path, monkeypatch):
    "A truncated record, a record of another version, a directory that cannot be written: the fit goes on, warned once"
    monkeypatch.setenv('CHANNELSLAST_CB_CACHE', str(tmp_path))
    first = json.loads(run_py(FIT, CHANNELSLAST_CB_CACHE=str(tmp_path)).stdout.strip().splitlines()[-1])
    (path,) = tmp_path.glob('*.json')
    for damage in (lambda t: t[: len(t) // 2], lambda t: t.replace('"version": 1', '"version": 99')):
        path.write_text(damage(path.read_text()))
        r = run_py(FIT + "\nimport warnings", CHANNELSLAST_CB_CACHE=str(tmp_path))
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert (out['setting'], out['source']) == (first['setting'], 'measured'), out  # measured again
        assert r.stderr.count('DecisionCacheWarning') == 1 and 'is ignored' in r.stderr, r.stderr[-2000:]
        json.loads(path.read_text())                                                 # and replaced, whole
    blocked = tmp_path / 'file'
    blocked.write_text('a file where the cache directory should be')
    r = run_py(FIT, CHANNELSLAST_CB_CACHE=str(blocked / 'sub'))
    assert json.loads(r.stdout.strip().splitlines()[-1])['setting'] == first['setting']
    assert r.stderr.count('DecisionCacheWarning') == 1 and 'could not be kept' in r.stderr, r.stderr[-2000:]


WRITER = """
import sys, json
from channelslast_cb.autotune import AutoDecision, Setting
from channelslast_cb.decide import read_decision, write_decision
key = {'k': 'same key for both writers', 'eligible': ['channels_last/fp32', 'channels_last/bf16']}
for i in range(150):
    s = Setting('channels_last', ('fp32', 'bf16')[(i + int(sys.argv[1])) % 2])
    write_decision(key, AutoDecision(s, (), i, {}))
    d = read_decision(key)
    assert d is not None and str(d.setting) in ('channels_last/fp32', 'channels_last/bf16'), d
print('ok')
"""


def test_two_processes_writing_at_once_never_leave_a_broken_record(tmp_path):
    env = {**os.environ, 'CHANNELSLAST_CB_CACHE': str(tmp_path), 'PYTHONPATH': str(ROOT), 'PYTHONWARNINGS': 'error'}
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob('.tmp-*'))  # no temporary file left
    (path,) = tmp_path.glob('*.json')
    assert json.loads(path.read_text())['version'] == decide.CACHE_VERSION


def make_learner(n=8 * 30):
    learn = Learner(DataLoaders.from_tensors(synth_images(n), bs=8), tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy,
                    progress=False)
    learn.recorder.print_table = False
    return learn


def fake_clock(learn, bf16=.6):
    cb, mp, t = learn.channels_last, learn.mixed_precision, [0.]
    def clock():
        t[0] += (.010 * bf16 if mp.precision == 'bf16' else .010) * (1.05 if cb.layout == 'contiguous' else 1.) / 2
        return t[0]
    cb._clock = clock


def conv_dtypes(learn):
    seen = []
    learn.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    return seen


def test_a_resumed_run_trains_in_the_decision_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', dict(BF16_FAST))
    monkeypatch.setenv('CHANNELSLAST_CB_CACHE', 'off')  # only the checkpoint can carry it
    learn = make_learner(); learn.path = tmp_path
    learn.to_channelslast(); fake_clock(learn)
    learn.fit(1)
    assert learn.channels_last.decision.precision == 'bf16'
    learn.save('ckpt')
    learn2 = make_learner(); learn2.path = tmp_path
    learn2.to_channelslast(); fake_clock(learn2, bf16=5.)  # a clock that would choose fp32: never read
    learn2.load('ckpt')
    seen = conv_dtypes(learn2)
    learn2.fit(1)
    d = learn2.channels_last.decision
    assert (d.source, d.precision, learn2.mixed_precision.precision) == ('checkpoint', 'bf16', 'bf16')
    assert set(seen) == {torch.bfloat16}                  # from the first step: no measuring step
    assert learn2.model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_autoresume_keeps_the_precision(tmp_path, monkeypatch):
    "SaveModelCallback(autoresume=True): the run picked up from its last epoch trains in the precision it had"
    from channelslast_cb.checkpoint import SaveModelCallback
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', dict(BF16_FAST))
    monkeypatch.setenv('CHANNELSLAST_CB_CACHE', 'off')
    learn = make_learner(); learn.path = tmp_path
    learn.to_channelslast(); fake_clock(learn)
    learn.fit(2, cbs=SaveModelCallback(monitor='train_loss', every_epoch=True, with_opt=True, autoresume=True))
    learn2 = make_learner(); learn2.path = tmp_path
    learn2.to_channelslast(); fake_clock(learn2, bf16=5.)
    seen = conv_dtypes(learn2)
    learn2.fit(3, cbs=SaveModelCallback(monitor='train_loss', every_epoch=True, with_opt=True, autoresume=True))
    assert learn2.channels_last.decision.source == 'checkpoint' and set(seen) == {torch.bfloat16}, seen[:4]


EXPORT = """
import torch, torch.nn.functional as F
from torch.utils.data import TensorDataset
from fastai.data.core import DataLoaders
from fastai.learner import Learner
import channelslast_cb.fastai
import channelslast_cb.fp16 as fp16
from channelslast_cb.fp16 import AMPMode, AMPSpeed
from helpers import EmptiableTensorDataset as TDS, synth_images, tiny_cnn_no_conv_bias
fp16.AMP_SPEEDS.update({('cpu', AMPMode.BF16): AMPSpeed('cpu', AMPMode.BF16, .8), ('cpu', AMPMode.FP16): AMPSpeed('cpu', AMPMode.FP16, 5.)})
dls = DataLoaders.from_dsets(TDS(*synth_images(8 * 30)), TDS(*synth_images(16, seed=1)), bs=8, device='cpu')
learn = Learner(dls, tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy, path=r'{path}')
learn.to_channelslast()
cb, mp, t = learn.channels_last, learn.mixed_precision, [0.]
def clock():
    t[0] += (.006 if mp.precision == 'bf16' else .010) / 2
    return t[0]
cb._clock = clock
with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
assert mp.precision == 'bf16', mp
cb._clock = None  # (a local function does not pickle; the decision is made)
learn.export('export.pkl')
print('exported')
"""

LOAD = """
import sys, torch
from fastai.learner import load_learner
assert 'channelslast_cb.fastai' not in sys.modules
learn = load_learner(r'{path}/export.pkl', cpu=False)  # (cpu=True: fastai's to_contiguous(to_fp32=True), below)
from torch.utils.data import TensorDataset
from fastai.data.core import DataLoaders
from helpers import synth_images
learn.dls = DataLoaders.from_dsets(TensorDataset(*synth_images(64)), TensorDataset(*synth_images(16, seed=1)), bs=8, device='cpu')
seen = []
learn.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
print(learn.mixed_precision.precision, set(seen) == {torch.bfloat16}, 'channelslast_cb.fastai' in sys.modules)
learn = load_learner(r'{path}/export.pkl', cpu=True)   # for inference on a CPU fastai drops channels-last and AMP
print(hasattr(learn, 'mixed_precision'), hasattr(learn, 'channels_last'), learn.model[0].weight.is_contiguous())
"""


def test_a_fastai_export_loaded_without_our_import_trains_in_the_precision_it_names(tmp_path):
    run_py(EXPORT.replace('{path}', str(tmp_path)), CHANNELSLAST_CB_CACHE='off')
    out = run_py(LOAD.replace('{path}', str(tmp_path)), CHANNELSLAST_CB_CACHE='off').stdout.strip().splitlines()[-2:]
    assert out[0] == 'bf16 True True', out  # it names bf16, computes in bf16, and installed our fastai integration
    assert out[1] == 'False False True', out  # load_learner(cpu=True) removes ours as fastai removes its own
