"""`channelslast_cb.lightning.ChannelsLast` on Lightning's own `Trainer` (no mocks): layouts by stage, numbers equal
to the contiguous run, batches with masks and other tensors, the precision check, repair of a MONAI UNet, resuming
from Lightning checkpoints, `torch.compile`, DDP on two processes, and Lightning staying optional.

The DDP checks run one `torchrun` launch of `lightning_ddp_worker.py` (Lightning joins torchrun's process group).
"""
import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision as LightningMixedPrecision
from torch import nn
from torch.utils.data import DataLoader

import channelslast_cb.fp16 as fp16
from channelslast_cb.audit import layout_report
from channelslast_cb.channelslast import ChannelsLastWarning
from channelslast_cb.fp16 import AMPMode, AMPSpeed, AMPSpeedWarning, amp_speed
from channelslast_cb.lightning import ChannelsLast
from helpers import LeNet, Spectrogram, Uint8Net, ViewMLP, as_uint8, record_c2, synth_images, tiny_cnn_no_conv_bias
from lightning_helpers import AtTrainStart, Classifier, StepClock, checksum, cl, loader, trainer
from test_distributed import torchrun

ROOT = Path(__file__).resolve().parents[1]
FP16, BF16 = AMPMode.FP16, AMPMode.BF16
pytestmark = [pytest.mark.filterwarnings(r'ignore:.*LeafSpec'),  # Lightning 2.6 on torch 2.9
              pytest.mark.filterwarnings(r'ignore:.*does not have many workers'),
              pytest.mark.filterwarnings(r'ignore:You defined a .validation_step. but have no .val_dataloader.')]
STAGES = ['predict', 'sanity_check', 'test', 'train', 'validate']


def run_all_stages(model, *callbacks):
    "fit (with validation and its sanity check), validate, test and predict on one Trainer; the predictions"
    t = trainer(*callbacks)
    t.fit(model, loader(), loader(16, seed=1))
    t.validate(model, loader(16, seed=1), verbose=False)
    t.test(model, loader(16, seed=1), verbose=False)
    return t, torch.cat(t.predict(model, loader(16, seed=1)))


def conv_weights(model): return [p for p in model.parameters() if p.dim() in (4, 5)]


# ---------------------------------------------------------------- layouts, by stage

def test_weights_and_first_conv_inputs_are_channels_last_in_every_stage():
    model = Classifier()
    t, _ = run_all_stages(model, ChannelsLast())
    assert sorted(set(model.seen)) == [(s, True) for s in STAGES]
    assert all(cl(p) for p in conv_weights(model))
    assert 'batch_to_device' not in t.strategy.__dict__  # the strategy is as it was after each run


def test_without_the_callback_nothing_is_channels_last():
    "The control: the same probes, the same Trainer calls, report NCHW"
    model = Classifier()
    run_all_stages(model)
    assert sorted(set(model.seen)) == [(s, False) for s in STAGES]
    assert not any(cl(p) for p in conv_weights(model))


def test_numbers_equal_the_contiguous_run():
    "fp32, Adam, 2 epochs: first-step gradients, final weights and buffers, predictions equal to rounding"
    a, b = Classifier(), Classifier()
    _, pa = run_all_stages(a, ChannelsLast())
    _, pb = run_all_stages(b)
    assert a.first_grads.keys() == b.first_grads.keys() and len(a.first_grads) == 7
    for k, g in a.first_grads.items():
        torch.testing.assert_close(g, b.first_grads[k], rtol=1e-5, atol=1e-6)
        assert g.dim() != 4 or (cl(g) and not cl(b.first_grads[k])), k  # the gradients themselves are channels-last
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a.net[0].weight, Classifier().net[0].weight)  # it trained


def test_conv3d_model_trains_in_channels_last_3d():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    model = Classifier(net)
    x, y = torch.randn(16, 1, 4, 6, 6), torch.arange(16) % 2
    dl = DataLoader(list(zip(x, y)), batch_size=8)
    trainer(ChannelsLast()).fit(model, dl, dl)
    assert sorted(set(model.seen)) == [('sanity_check', True), ('train', True), ('validate', True)]
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


# ---------------------------------------------------------------- batches

class Segmenter(LightningModule):
    "Records the batch its training step receives"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.batches = nn.Conv2d(3, 2, 3, padding=1), []

    def training_step(self, batch, i):
        self.batches.append(batch)
        return F.cross_entropy(self.net(batch['image']), batch['masks'][:, 0])

    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)


class Batches:
    "An iterable of ready-made batches as a Lightning train loader"
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)
    def __len__(self): return len(self.batches)


def test_segmentation_batch_converts_float_images_only():
    "Nested dict/tuple/list: float 4-D/5-D converted (same values); integer masks, other tensors, strings untouched"
    g = torch.Generator().manual_seed(0)
    def batch():
        return {'image': torch.randn(4, 3, 8, 8, generator=g),
                'masks': torch.randint(0, 2, (4, 2, 8, 8), generator=g),                  # integer, 4-D
                'extra': (torch.randn(4, 5, generator=g),                                # float, not an image
                          [torch.randn(4, 2, 3, 4, 4, generator=g), torch.randn(4, 2, 8, 8, dtype=torch.float64,
                                                                                generator=g)],
                          torch.randint(0, 9, (4, 1, 2, 4, 4), generator=g), ['a.png'] * 4)}
    made = [batch(), batch()]  # ready-made batches: on the CPU, batch_to_device returns their tensors as they are
    model = Segmenter()
    trainer(ChannelsLast()).fit(model, Batches(made))
    assert len(model.batches) == 2
    for got, want in zip(model.batches, made):
        vector, (volume, doubles), ints5, names = got['extra']
        assert cl(got['image']) and torch.equal(got['image'], want['image'])
        assert cl(volume) and torch.equal(volume, want['extra'][1][0])            # 5-D float: channels_last_3d
        assert cl(doubles) and torch.equal(doubles, want['extra'][1][1])           # float64 too
        assert got['masks'] is want['masks'] and got['masks'].is_contiguous()    # untouched: the same tensors
        assert vector is want['extra'][0] and ints5 is want['extra'][2] and names == ['a.png'] * 4
        assert isinstance(got['extra'], tuple) and isinstance(got['extra'][1], list)
        assert not cl(want['image'])  # the loader's own batch was not changed in place


def test_user_transfer_hooks_run_first():
    "The conversion comes after the module's own on_after_batch_transfer (which here makes a new NCHW tensor)"
    class Doubling(Classifier):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return [batch[0].contiguous() * 2, batch[1]]
    model = Doubling()
    trainer(ChannelsLast()).fit(model, loader())
    assert set(model.seen) == {('train', True)}


# ---------------------------------------------------------------- the precision check

@pytest.fixture
def fresh(monkeypatch):
    "An empty probe cache: the measurement is made (or injected) in the test"
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {})


def fit_warnings(cb, **trainer_kw):
    "The AMPSpeedWarning messages of one short fit; the Trainer"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        t = trainer(cb, max_steps=2, **trainer_kw)
        t.fit(Classifier(), loader())
    return [str(w.message) for w in caught if issubclass(w.category, AMPSpeedWarning)], t


@pytest.mark.parametrize('precision', ['bf16-mixed', '16-mixed'])
def test_precision_warning_exactly_when_measured_slow_here(fresh, precision):
    "The real probe on the running machine ('16-mixed' is bf16 on a CPU for Lightning): warns iff measured slow"
    said, t = fit_warnings(cb := ChannelsLast(), precision=precision)
    speed = amp_speed(BF16, 'cpu')  # measured during the fit, cached: the same measurement
    assert cb.amp_speed is speed and speed is not None
    assert t.precision == 'bf16-mixed'  # Lightning's doing on a CPU; the callback changed nothing
    if speed.slow:
        assert len(said) == 1, said
        assert f"{speed.ratio:.1f}x fp32's time" in said[0] and "Pass precision='32-true' to the Trainer" in said[0]
        assert "Trainer(precision='bf16-mixed')" in said[0] and "'16-mixed' on a CPU" in said[0]
    else:
        assert said == []


# machine kinds, as the probe measured (or would measure) them: (ratio, native, capped)
KINDS = {'amd_epyc_zen3_avx2': (3.1, False, False), 'xeon_amx_bf16': (0.55, True, False),
         'no_native_bf16_pathological': (40., False, True), 'just_under_the_limit': (1.9, False, False)}


@pytest.mark.parametrize('kind', KINDS)
def test_precision_warning_with_injected_measurements(fresh, kind):
    ratio, native, capped = KINDS[kind]
    fp16.AMP_SPEEDS[('cpu', BF16)] = AMPSpeed('cpu', BF16, ratio, native, capped)
    said, t = fit_warnings(ChannelsLast(), precision='bf16-mixed')
    assert t.precision == 'bf16-mixed'
    if ratio > fp16.AMP_SLOW_RATIO:
        assert len(said) == 1 and f"took {'at least ' if capped else ''}{ratio:.1f}x fp32's time" in said[0], said
    else:
        assert said == []


def test_fp16_autocast_plugin_is_measured_as_fp16(fresh):
    "Lightning's fp16 autocast on a CPU (only through its plugin: the flag turns into bf16) is checked as fp16"
    fp16.AMP_SPEEDS[('cpu', FP16)] = AMPSpeed('cpu', FP16, 5.6, False)
    fp16.AMP_SPEEDS[('cpu', BF16)] = AMPSpeed('cpu', BF16, 0.8, True)
    said, t = fit_warnings(ChannelsLast(), plugins=[LightningMixedPrecision('16-mixed', 'cpu')])
    assert t.precision == '16-mixed'
    assert len(said) == 1 and 'fp16 autocast' in said[0] and 'took 5.6x' in said[0]


def test_full_precision_is_not_measured(fresh):
    said, _ = fit_warnings(cb := ChannelsLast(), precision='32-true')
    assert said == [] and cb.amp_speed is None and fp16.AMP_SPEEDS == {}  # no probe ran


def test_the_precision_stays_the_users(fresh):
    "Slow or not, the first convolution computes in bfloat16 under precision='bf16-mixed'"
    fp16.AMP_SPEEDS[('cpu', BF16)] = AMPSpeed('cpu', BF16, 3.1, False)
    model, dtypes = Classifier(), []
    model.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', AMPSpeedWarning)
        trainer(ChannelsLast(), precision='bf16-mixed', max_steps=2).fit(model, loader())
    assert set(dtypes) == {torch.bfloat16} and set(model.seen) == {('train', True)}


# ---------------------------------------------------------------- repair

class UNetModule(LightningModule):
    def __init__(self):
        super().__init__()
        from monai.networks.nets import UNet
        torch.manual_seed(0)
        self.net = UNet(2, 2, 3, (8, 16, 32), (2, 2), norm='instance')

    def training_step(self, batch, i): return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self): return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize('repair', [True, False])
def test_repair_monai_instance_norm_unet(repair):
    "repair=True: 0 layout-changing copies left, forward and backward (without it, the control: copies)"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 32, 32, generator=g), torch.randint(0, 3, (8, 32, 32), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # MONAI's deprecation chatter
        model, cb = UNetModule(), ChannelsLast(repair=repair)
        trainer(cb, max_steps=2).fit(model, DataLoader(list(zip(x, y)), batch_size=4))
        report = layout_report(model.net, x[:2], backward=True)
    assert all(cl(p) for p in conv_weights(model))
    if repair:
        assert len(cb.fixes.repaired) == 4 and cb.fixes.skipped == []
        assert {type(m).__name__ for m in model.modules() if 'InstanceNorm' in type(m).__name__} == {'InstanceNorm2dCL'}
        assert report.n_copies == 0, report.table(breaks_only=True)
    else:
        assert cb.fixes == [] and report.n_copies >= 4


# ---------------------------------------------------------------- checkpoints

def fit_with_checkpoints(tmp_path, *callbacks, max_epochs=1, ckpt_path=None, seed=0):
    "Fit 2 epochs' worth of steps (4 batches an epoch) with ModelCheckpoint writing last.ckpt; the model"
    model = Classifier(tiny_cnn_no_conv_bias(seed=seed))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(*callbacks, ckpt, max_epochs=max_epochs, enable_checkpointing=True).fit(model, loader(), ckpt_path=ckpt_path)
    return model


def test_resume_from_a_contiguous_checkpoint_matches_the_optimizer_state(tmp_path):
    "A checkpoint written without ChannelsLast (Adam's moments NCHW) resumes with moments laid out like the weights"
    fit_with_checkpoints(tmp_path)
    saved = torch.load(tmp_path / 'last.ckpt', weights_only=False)
    moments = [v for st in saved['optimizer_states'][0]['state'].values() for v in st.values() if v.dim() == 4]
    assert len(moments) == 4 and not any(cl(v) for v in moments)  # the control: the file holds NCHW state
    probe = AtTrainStart()
    model = fit_with_checkpoints(tmp_path, ChannelsLast(), probe, max_epochs=2, ckpt_path=tmp_path / 'last.ckpt', seed=1)
    assert probe.seen == dict(step=4, params=[True, True], state=[True] * 4)  # resumed at step 4, all channels-last
    assert all(cl(p) for p in conv_weights(model))


def test_resume_from_a_channels_last_checkpoint_equals_the_uninterrupted_run(tmp_path):
    "ModelCheckpoint writes channels-last state; fit(ckpt_path=...) goes on in channels-last to the same weights"
    fit_with_checkpoints(tmp_path, ChannelsLast())
    saved = torch.load(tmp_path / 'last.ckpt', weights_only=False)
    assert cl(saved['state_dict']['net.0.weight'])
    probe = AtTrainStart()
    resumed = fit_with_checkpoints(tmp_path, ChannelsLast(), probe, max_epochs=2, ckpt_path=tmp_path / 'last.ckpt', seed=1)
    assert probe.seen == dict(step=4, params=[True, True], state=[True] * 4)
    straight = fit_with_checkpoints(tmp_path / 'straight', ChannelsLast(), max_epochs=2)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_without_auto_the_callback_has_no_checkpoint_state(tmp_path):
    fit_with_checkpoints(tmp_path, ChannelsLast())
    assert not any('ChannelsLast' in k for k in torch.load(tmp_path / 'last.ckpt', weights_only=False)['callbacks'])


# ---------------------------------------------------------------- torch.compile

class Recording:
    "A torch.compile backend: records, per graph, whether all its 4-D inputs (weights, images) are channels-last"
    def __init__(self): self.graphs = []

    def __call__(self, gm, example_inputs):
        four = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4]
        self.graphs.append((len(four), all(cl(t) for t in four)))
        return gm.forward


def test_compiled_module_sees_channels_last_weights_and_inputs():
    "trainer.fit(torch.compile(module)): Lightning compiles the steps; every graph's 4-D inputs are channels-last"
    rec, model = Recording(), Classifier()
    trainer(ChannelsLast(), limit_val_batches=1).fit(torch.compile(model, backend=rec), loader(), loader(16, seed=1))
    assert rec.graphs and sum(n for n, _ in rec.graphs) >= 3 and all(ok for _, ok in rec.graphs), rec.graphs


def test_compiled_run_equals_eager():
    "aot_eager: dynamo and AOTAutograd's forward and backward graphs (what inductor receives), without codegen"
    compiled, eager = Classifier(), Classifier()
    trainer(ChannelsLast(), max_steps=3).fit(torch.compile(compiled, backend='aot_eager'), loader())
    trainer(ChannelsLast(), max_steps=3).fit(eager, loader())
    assert all(cl(p) for p in conv_weights(compiled))
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- auto=True: the shared StepTrial on Lightning's steps

FASTER = {'channels_last': {'channels_last': 1., 'contiguous': 3.}, 'contiguous': {'channels_last': 3., 'contiguous': 1.}}  # 3x: dropped after its first timed step


def auto_fit(want, *callbacks, precision='32-true', ckpt_path=None, max_epochs=2, window=(1, 1, 3), **kw):
    "Fit with ChannelsLast(auto=True) whose clock makes `want` the faster layout; (callback, model, printed)"
    cb, model = ChannelsLast(True, False, *window), Classifier()
    cb._clock = StepClock(cb, FASTER[want])
    with contextlib.redirect_stdout(io.StringIO()) as out, warnings.catch_warnings():
        warnings.simplefilter('ignore', AMPSpeedWarning)
        trainer(cb, *callbacks, max_epochs=max_epochs, precision=precision, **kw).fit(
            model, loader(64), loader(16, seed=1), ckpt_path=ckpt_path)
    return cb, model, out.getvalue()


@pytest.mark.parametrize('want', ['channels_last', 'contiguous'])
def test_auto_keeps_the_faster_layout(want):
    cb, model, printed = auto_fit(want)
    d = cb.decision
    assert (d.layout, d.precision, d.steps, cb.layout) == (want, 'fp32', 4, want)  # the slower dropped after round 1
    assert [r['setting'].layout for r in d.table] == ['channels_last', 'contiguous']  # both timed, channels-last first
    assert printed.count('ChannelsLast(auto)') == 1 and f'kept {want}/fp32' in printed, printed
    train = [ok for stage, ok in model.seen if stage == 'train']
    assert len(train) == 16 and train[4:] == [want == 'channels_last'] * 12  # every step after the decision
    w = model.net[0].weight
    assert cl(w) == (want == 'channels_last')
    assert all(v.stride() == w.stride() for v in model.trainer.optimizers[0].state[w].values() if v.dim() == 4)
    assert cb._t0 is None and cb.trial.decision is d


def test_auto_times_layouts_under_the_trainers_precision_only():
    "precision='bf16-mixed': both layouts timed in bf16, nothing else; the Trainer's precision as set"
    cb, model, printed = auto_fit('contiguous', precision='bf16-mixed')
    assert {r['setting'].precision for r in cb.decision.table} == {'bf16'} and cb.decision.layout == 'contiguous'
    assert model.trainer.precision == 'bf16-mixed'
    assert "ChannelsLast(auto) under Trainer(precision='bf16-mixed'): kept contiguous/bf16" in printed


def test_auto_precision_the_decision_cannot_name_keeps_channels_last():
    with pytest.warns(ChannelsLastWarning, match=r"not Trainer\(precision='64-true'\): it keeps channels_last"):
        cb, model, printed = auto_fit('contiguous', precision='64-true')
    assert cb.trial is None and cb.decision is None and cl(model.net[0].weight) and printed == ''


def test_auto_decision_is_saved_and_resumed_without_measuring(tmp_path):
    ckpt = lambda: ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    cb, _, _ = auto_fit('contiguous', ckpt(), enable_checkpointing=True)
    saved = torch.load(tmp_path / 'last.ckpt', weights_only=True)['callbacks']['ChannelsLast']
    assert saved == dict(layout='contiguous', precision='fp32', decision=str(cb.decision))
    probe = AtTrainStart()
    # resumed by a callback whose clock would now favour channels-last: the checkpoint's decision stands
    again, model, printed = auto_fit('channels_last', ckpt(), probe, enable_checkpointing=True, max_epochs=3,
                                     ckpt_path=tmp_path / 'last.ckpt')
    assert again.trial is None and again.decision == saved and again.layout == 'contiguous' and printed == ''
    assert probe.seen == dict(step=16, params=[False, False], state=[False] * 4)  # contiguous from the first step on
    assert {ok for _, ok in model.seen} == {False}  # every batch of the resumed fit, training and validation


def test_auto_fit_that_ends_early_goes_on_measuring_in_the_next():
    cb, model = ChannelsLast(auto=True, warmup=1, block=1, rounds=3), Classifier()
    cb._clock = StepClock(cb, FASTER['contiguous'])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer(cb, max_steps=3).fit(model, loader(64))
    assert cb.decision is None and cb.trial.steps == 3
    assert 'the fit ended after 3 measuring steps, before the decision' in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer(cb, max_epochs=1).fit(model, loader(64))
    assert cb.decision.layout == 'contiguous' and cb.decision.steps == 3 + 1 + 1  # + one cold step, then 1 more
    assert 'kept contiguous/fp32' in out.getvalue()



# ---------------------------------------------------------------- DDP, two processes

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "What rank 0 and rank 1 of one torchrun launch of lightning_ddp_worker.py saw"
    out = tmp_path_factory.mktemp('lightning_ddp')
    torchrun('tests/lightning_ddp_worker.py', str(out))
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


def test_ddp_ranks_end_with_identical_weights(ranks):
    assert [r['world'] for r in ranks] == [2, 2]
    a, b = (r['channels_last'] for r in ranks)
    assert a['checksum'] == b['checksum']  # started from different weights (seed = rank): DDP synchronised them
    assert a['steps'] == b['steps'] == 4 * 2  # 32 images per rank, batches of 8, 2 epochs


def test_ddp_buckets_are_built_channels_last(ranks):
    "Converted in setup, before the wrap: gradients that are views into DDP's buckets are channels-last, no warning"
    for r in ranks:
        a = r['channels_last']
        assert a['wrapped'] == ['DistributedDataParallel'] and a['param_cl'] is True
        assert a['grad_cl'] == [True] and a['grad_warn'] == []
        assert a['inputs'] == [['sanity_check', True], ['train', True], ['validate', True]]


def test_ddp_converting_after_the_wrap_is_caught(ranks):
    "The control: converted at on_fit_start (after the wrap), the buckets are NCHW and DDP warns about the strides"
    for r in ranks:
        late = r['late']
        assert late['param_cl'] is True and False in late['grad_cl'] and late['grad_warn']


def test_ddp_auto_one_decision_for_all_ranks(ranks):
    "Rank 0's clock alone would keep channels-last; the ranks' average keeps contiguous, on both, said once"
    a, b = (r['auto'] for r in ranks)
    assert a['layout'] == b['layout'] == 'contiguous' and a['steps'] == b['steps']
    assert a['table'] == b['table'] == [['channels_last/fp32', 2 / 1.5, None], ['contiguous/fp32', 1.0, None]]  # averaged
    assert len(a['said']) == 1 and 'kept contiguous/fp32' in a['said'][0] and b['said'] == []
    assert a['checksum'] == b['checksum'] and a['param_cl'] is b['param_cl'] is False


# ---------------------------------------------------------------- bad input, optional Lightning

@pytest.mark.parametrize('kw, msg', [({'auto': 'yes'}, "auto must be True or False, got 'yes'"),
                                     ({'repair': 1}, 'repair must be True or False, got 1')])
def test_non_bool_switches(kw, msg):
    with pytest.raises(TypeError, match=msg): ChannelsLast(**kw)


def test_model_without_convolutions_warns_and_trains_unchanged():
    def fit(*callbacks):
        torch.manual_seed(0)
        model = MLP()
        t = trainer(*callbacks, max_epochs=2)
        t.fit(model, loader())
        return model, t
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        a, t = fit(cb := ChannelsLast())
    said = [str(w.message) for w in caught if issubclass(w.category, ChannelsLastWarning)]
    assert len(said) == 1 and 'the model (MLP) has no 2-D or 3-D convolution' in said[0]
    assert 'leaves the model and its batches exactly as they are' in said[0]  # the message every host gives
    assert cb.active is False and 'batch_to_device' not in t.strategy.__dict__
    b, _ = fit()
    assert checksum(a) == checksum(b)  # bit for bit the run without the callback


class MLP(LightningModule):
    "Images through Flatten and a Linear: 4-D inputs, no convolution"
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    def training_step(self, batch, i): return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self): return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_two_channelslast_callbacks_are_refused():
    "Lightning itself refuses two callbacks with one state key (ours has state: the auto decision)"
    with pytest.raises(RuntimeError, match='more than one stateful callback of type `ChannelsLast`'):
        trainer(ChannelsLast(), ChannelsLast())


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_only_the_lightning_module_imports_lightning():
    code = ("import sys, channelslast_cb.all, channelslast_cb.bench, channelslast_cb.distributed, channelslast_cb.fastai\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
            "assert not bad, bad\n"
            "import channelslast_cb.lightning\n"
            "assert 'lightning.pytorch' in sys.modules\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]


def test_without_lightning_the_import_error_says_what_to_install():
    code = ("import sys\n"
            "class NoLightning:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'lightning': raise ImportError(f'No module named {name!r} (blocked)')\n"
            "sys.meta_path.insert(0, NoLightning())\n"
            "from channelslast_cb.all import *\n"
            "try: import channelslast_cb.lightning\n"
            "except ImportError as e: print('IMPORT-ERROR', e)\n"
            "else: raise AssertionError('imported without Lightning')\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'IMPORT-ERROR' in r.stdout and 'pip install "channelslast_cb[lightning]"' in r.stdout and 'needs lightning' in r.stdout



# ---------------------------------------------------------------------------------------------------------------
# Models a newcomer brings (issue 24): the same behaviour as on our Learner and fastai's
class Net(LightningModule):
    "A LightningModule around `net`, trained with SGD on (x, y) batches"
    def __init__(self, net):
        super().__init__()
        self.net = net
    def training_step(self, batch, i): return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_net(net, x=lambda x: x):
    xs, y = synth_images(32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        trainer(ChannelsLast()).fit(Net(net), DataLoader(torch.utils.data.TensorDataset(x(xs), y), batch_size=8))
    return [str(o.message) for o in w if issubclass(o.category, ChannelsLastWarning)]


def test_a_model_without_convolutions_trains_untouched_said_once():
    net = ViewMLP()
    msgs = fit_net(net)
    assert len(msgs) == 1 and 'leaves the model and its batches exactly as they are' in msgs[0], msgs
    assert "Remove ChannelsLast from the Trainer's callbacks" in msgs[0]
    assert not net.mean.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('model, x', [(Spectrogram, lambda x: x[:, 0]), (Uint8Net, as_uint8)], ids=['spectrogram', 'uint8'])
def test_no_warning_for_a_model_that_builds_its_own_images(model, x):
    torch.manual_seed(0)
    net, seen = model(), []
    record_c2(net, seen)
    assert fit_net(net, x) == []
    assert seen and set(seen) == {(True, True)}


def test_view_after_the_convolutions_says_where_and_what_to_change():
    with pytest.raises(RuntimeError, match=r"a `\.view` met a channels-last tensor in module 'net' \(LeNet\), "
                                           r"at .*helpers\.py:\d+ in forward: x = x\.view\(-1, self\.n\)") as e:
        fit_net(LeNet())
    assert 'Use `.flatten(1)` or `.reshape(...)` there' in str(e.value)
    assert "remove ChannelsLast from the Trainer's callbacks" in str(e.value)
    assert str(e.value).count('ChannelsLast:') == 1


# ---------------------------------------------------------------------------------------------------------------
# Issue 23: the Lightning callback leaves the Trainer's precision as set, and warns from per-model evidence

def test_warns_from_a_decision_kept_for_this_model(monkeypatch):
    "Our Learner's default call decided bf16 for this network (kept on disk); the Trainer trains it in fp32: said"
    from channelslast_cb.learner import DataLoaders, Learner
    monkeypatch.setattr(fp16, 'AMP_SPEEDS', {('cpu', AMPMode.BF16): AMPSpeed('cpu', AMPMode.BF16, .8),
                                             ('cpu', AMPMode.FP16): AMPSpeed('cpu', AMPMode.FP16, 5.)})
    learn = Learner(DataLoaders.from_tensors(synth_images(8 * 30), bs=8), tiny_cnn_no_conv_bias(),
                    loss_func=F.cross_entropy, progress=False)
    learn.recorder.print_table = False
    learn.to_channelslast()
    cb, mp, t = learn.channels_last, learn.mixed_precision, [0.]
    def clock():
        t[0] += (.006 if mp.precision == 'bf16' else .010) / 2
        return t[0]
    cb._clock = clock
    learn.fit(1)
    assert cb.decision.precision == 'bf16' and cb.decision.source == 'measured'
    lcb = ChannelsLast()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        trainer(lcb).fit(Classifier(), loader(32))
    msgs = [str(o.message) for o in w if issubclass(o.category, AMPSpeedWarning)]
    assert len(msgs) == 1 and "Pass precision='bf16-mixed' to the Trainer" in msgs[0], msgs
    assert 'fp32 took 1.67x its step time' in msgs[0] and lcb.evidence.precision == 'bf16'
    assert w[[issubclass(o.category, AMPSpeedWarning) for o in w].index(True)].filename == __file__  # the user's line
    with warnings.catch_warnings(record=True) as w:  # the Trainer in the precision the evidence names: nothing to say
        warnings.simplefilter('always')
        trainer(ChannelsLast(), precision='bf16-mixed').fit(Classifier(), loader(32))
    assert not [o for o in w if issubclass(o.category, AMPSpeedWarning)]
