"""One rank of the Lightning DDP checks in `test_lightning.py`: `torchrun --nproc_per_node 2 tests/lightning_ddp_worker.py OUT`.

Lightning's `Trainer(accelerator='cpu', devices=2, strategy=DDPStrategy(...))` finds torchrun's environment and joins
its process group (gloo) instead of launching processes itself, so one launch runs several fits. Each rank writes what
it saw to `OUT/rank<r>.json`; the test compares the ranks. Not collected by pytest.
"""
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy

from channelslast_cb.channelslast import to_channels_last
from channelslast_cb.lightning import ChannelsLast
from helpers import exit_worker, tiny_cnn_no_conv_bias  # tests/ is this script's folder, so it is on sys.path
from lightning_helpers import Classifier, StepClock, checksum, cl, loader, trainer

GRAD_STRIDES = 'Grad strides do not match bucket view strides'


class Grads(Callback):
    """After each backward: whether every 4-D gradient is channels-last. With `gradient_as_bucket_view=True` the
    gradients are views into DDP's buckets, laid out as the parameters were when DDP built them"""
    def __init__(self): self.grad_cl, self.wrapped = set(), set()

    def on_after_backward(self, trainer, pl_module):
        self.wrapped.add(type(trainer.strategy.model).__name__)
        self.grad_cl.add(all(cl(p.grad) for p in pl_module.parameters() if p.dim() == 4))


class LateConversion(Callback):
    "The wrong order, for the control: converts the module at `on_fit_start`, after the strategy wrapped it in DDP"
    def on_fit_start(self, trainer, pl_module): to_channels_last(pl_module)


def fit(*callbacks, seed, max_epochs=2):
    "Fit a Classifier (different initial weights on each rank: DDP copies rank 0's) on 64 images, 32 per rank"
    model, grads = Classifier(tiny_cnn_no_conv_bias(seed=seed)), Grads()
    t = trainer(*callbacks, grads, devices=2, max_epochs=max_epochs,
                strategy=DDPStrategy(gradient_as_bucket_view=True, process_group_backend='gloo'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        t.fit(model, loader(64, shuffle=True), loader(16, seed=1))
    return dict(checksum=checksum(model), wrapped=sorted(grads.wrapped), grad_cl=sorted(grads.grad_cl),
                param_cl=all(cl(p) for p in model.parameters() if p.dim() == 4),
                inputs=sorted(set(model.seen)), steps=t.global_step,
                grad_warn=[str(o.message)[:120] for o in w if GRAD_STRIDES in str(o.message)])


def fit_auto(rank: int):
    """ChannelsLast(auto=True) with clocks that disagree: rank 0 finds channels-last 2x faster, rank 1 finds it 3x
    slower. Averaged over the ranks (2.0 vs 1.5 a step) contiguous wins, so both must keep it, said once"""
    cb = ChannelsLast(auto=True, warmup=1, block=1, rounds=2)
    cb._clock = StepClock(cb, [{'channels_last': 1., 'contiguous': 2.}, {'channels_last': 3., 'contiguous': 1.}][rank])
    out = io.StringIO()
    with contextlib.redirect_stdout(out): res = fit(cb, seed=rank, max_epochs=3)
    d = cb.decision
    return dict(res, layout=d.layout, steps=d.steps, table=[[str(r['setting']), r['vs_kept'], r['dropped_after']] for r in d.table],
                said=[l for l in out.getvalue().splitlines() if 'ChannelsLast(auto)' in l])


def main(out: Path):
    torch.set_num_threads(1)
    torch.set_warn_always(True)  # DDP's gradient-layout warning is once per process otherwise: check every fit
    res = {}
    res['channels_last'] = fit(ChannelsLast(), seed=dist_rank())
    res['late'] = fit(LateConversion(), seed=dist_rank())  # the control: the same check fails in the wrong order
    res['auto'] = fit_auto(dist_rank())
    res['world'] = dist.get_world_size()
    (out / f'rank{dist.get_rank()}.json').write_text(json.dumps(res))


def dist_rank() -> int:
    import os
    return int(os.environ['RANK'])


if __name__ == '__main__':
    main(Path(sys.argv[1]))
    dist.destroy_process_group()  # Lightning leaves a gloo group alive (it destroys only nccl groups at exit)
    exit_worker()
