"The names DESIGN.md promises are importable from `channelslast_cb.all`, and the three user lines work."
import inspect
import subprocess
import sys

import torch.nn.functional as F

import channelslast_cb.all as cl

DESIGN_NAMES = """EVENTS event Callback CancelFitException CancelEpochException CancelTrainException CancelValidException
CancelBatchException CancelStepException CancelBackwardException Learner DataLoaders TrainEvalCallback Recorder
ProgressCallback accuracy error_rate AMPMode MixedPrecision ChannelsLast to_channels_last layout_report LayoutReport
bench_models DistributedTrainer repair_layout SaveModelCallback""".split()


def test_design_names_are_exported():
    missing = [n for n in DESIGN_NAMES if not hasattr(cl, n)]
    assert missing == []
    for meth in ('fit', 'fit_one_cycle', 'validate', 'get_preds', 'add_cb', 'add_cbs', 'remove_cb', 'remove_cbs',
                 'added_cbs', 'removed_cbs', 'save', 'load', 'show_training_loop', 'to_fp16', 'to_bf16', 'to_fp32',
                 'to_channelslast', 'to_contiguous', 'layout_report', 'compile', 'uncompile'):
        assert callable(getattr(cl.Learner, meth)), meth
    for meth in ('fit', 'fit_one_cycle'):  # resume a run: fastai's keyword
        assert 'start_epoch' in inspect.signature(getattr(cl.Learner, meth)).parameters, meth
    params = inspect.signature(cl.SaveModelCallback).parameters
    assert list(params)[:8] == [
        'monitor', 'comp', 'min_delta', 'fname', 'every_epoch', 'at_end', 'with_opt', 'reset_on_fit']  # fastai's
    assert {n: p.kind for n, p in list(params.items())[8:]} == {'autoresume': inspect.Parameter.KEYWORD_ONLY}  # ours
    # this round: 'auto' is an AMPMode, the default of to_channelslast() and of MixedPrecision()
    assert cl.AMPMode('auto') is cl.AMPMode.AUTO
    assert inspect.signature(cl.Learner.to_channelslast).parameters['amp_mode'].default == 'auto'
    assert inspect.signature(cl.MixedPrecision).parameters['amp_mode'].default == 'auto'


def test_all_does_not_import_fastai():
    "fastai stays optional: only `channelslast_cb.fastai` imports it"
    code = "import sys, channelslast_cb.all; assert 'fastai' not in sys.modules, sorted(m for m in sys.modules if 'fastai' in m)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_callback_names():
    assert cl.ChannelsLast().name == 'channels_last'
    assert cl.MixedPrecision().name == 'mixed_precision'


def test_the_three_user_lines():
    from helpers import synth_images, tiny_cnn
    dls = cl.DataLoaders.from_tensors(synth_images(16), valid=synth_images(8, seed=1), bs=8)
    model = tiny_cnn()
    learn = cl.Learner(dls, model, loss_func=F.cross_entropy, cbs=cl.ChannelsLast(), progress=False)
    assert learn.to_channelslast() is learn
    assert [type(c).__name__ for c in learn.cbs if isinstance(c, (cl.ChannelsLast, cl.MixedPrecision))] == \
        ['ChannelsLast', 'MixedPrecision']
    assert learn.mixed_precision.amp_mode is cl.AMPMode.AUTO  # the precision that is fast on this machine
    assert learn.mixed_precision.precision == cl.decide_amp('cpu').precision
    assert learn.to_contiguous(to_fp32=True) is learn
    assert not any(isinstance(c, (cl.ChannelsLast, cl.MixedPrecision)) for c in learn.cbs)
    assert model[0].weight.is_contiguous()
