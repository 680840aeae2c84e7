"""One rank of the DDP checks in `test_distributed.py`, run as `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT`.

Each rank trains the same learners with `DistributedTrainer` (real gloo process group, CPU) and writes what it
saw to `OUT/rank<r>.json`; the test compares the ranks and checks the values. Not collected by pytest.
"""
import contextlib
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.distributed import DistributedTrainer, num_distrib, rank_distrib, setup_distrib, teardown_distrib
from channelslast_cb.learner import DataLoaders, Learner, TensorBatches, accuracy
from helpers import exit_worker, synth_images, tiny_cnn  # tests/ is this script's folder, so it is on sys.path

GRAD_STRIDES = 'Grad strides do not match bucket view strides'


class Seen(Callback):
    "Per training batch: the model as the loop runs it, its layout, and which items the batch holds"
    order, run_valid = 12, False  # after DistributedTrainer (11): sees the wrapped model

    def before_fit(self): self.items, self.wrapped, self.param_cl, self.xb_cl = [], set(), set(), set()
    def before_epoch(self): self.items.append([])

    def before_batch(self):
        model = self.model
        plain = getattr(model, 'module', model)
        self.wrapped.add(type(model).__name__)
        self.param_cl.add(all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4))
        self.xb_cl.add(self.xb[0].is_contiguous(memory_format=torch.channels_last))
        self.items[-1].extend(self.xb[0][:, 0, 0, 0].tolist())  # an item's key: its first pixel (exact: no arithmetic)


def checksum(model) -> str:
    "sha256 over the bytes of every parameter and buffer, in a fixed order and layout"
    h = hashlib.sha256()
    for k, v in model.state_dict().items(): h.update(k.encode()); h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fit(learn, n_epoch, **kw):
    "Fit, returning what was printed and the DDP gradient-layout warnings raised"
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as w, contextlib.redirect_stdout(out):
        warnings.simplefilter('always')
        learn.fit(n_epoch, **kw)
    return out.getvalue(), [str(o.message)[:120] for o in w if GRAD_STRIDES in str(o.message)]


def table(learn):
    rec = learn.recorder
    return [{'epoch': e, **dict(zip(rec.metric_names[1:], row))} for e, row in zip(rec.epochs, rec.values)]


def cl(model): return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


def main(out: Path):
    torch.set_num_threads(1)
    torch.set_warn_always(True)  # DDP's gradient-layout warning is once per process otherwise: check every fit
    torch.manual_seed(rank_distrib())  # different generators on purpose: sharding must not depend on them
    created = setup_distrib(timeout=60)  # a hang in a collective fails after a minute instead of never
    rank, res = rank_distrib(), {'world': num_distrib()}

    # 1. ChannelsLast + DistributedTrainer on shuffled in-memory batches: 8 training batches, 5 validation batches
    x, y = synth_images(64, seed=0)
    xv, yv = synth_images(40, seed=1)
    dls = DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8)
    learn = Learner(dls, tiny_cnn(seed=rank), loss_func=F.cross_entropy, metrics=accuracy, lr=1e-2,
                    cbs=[ChannelsLast(), Seen()], progress=False)
    with learn.distrib_ctx():
        printed, grad_warn = fit(learn, 2)
        a = dict(printed=printed, grad_warn=grad_warn, items=learn.seen.items, train_keys=x[:, 0, 0, 0].tolist(),
                 wrapped=sorted(learn.seen.wrapped), param_cl=sorted(learn.seen.param_cl), xb_cl=sorted(learn.seen.xb_cl),
                 model_after=type(learn.model).__name__, cl_after=cl(learn.model), dls_after=learn.dls is dls,
                 checksum=checksum(learn.model), table=table(learn), validate=learn.validate(),
                 n_preds=len(learn.get_preds()[0]))
        with learn.removed_cbs(learn.distributed_trainer):
            a['validate_single'] = learn.validate()  # this process alone, on the whole validation set
        # the plain model is free of DDP: a backward on rank 0 only must not wait for rank 1
        if rank == 0: learn.model(xv[:4].to(memory_format=torch.channels_last)).sum().backward()
        dist.barrier()
        learn.opt.zero_grad()
        # a later fit wraps again, and leaves the ranks identical again
        _, a['grad_warn2'] = fit(learn, 1)
        a['checksum2'], a['model_after2'] = checksum(learn.model), type(learn.model).__name__
    a['trainer_after_ctx'] = any(isinstance(c, DistributedTrainer) for c in learn.cbs)
    a['group_after_ctx'] = dist.is_initialized()  # this script created the group: distrib_ctx leaves it alone
    res['tensor_batches'] = a

    # 2. A shuffled torch DataLoader: rebuilt around a DistributedSampler, reshuffled every epoch
    x2, y2 = synth_images(48, seed=2)
    dls = DataLoaders(DataLoader(TensorDataset(x2, y2), batch_size=8, shuffle=True),
                      DataLoader(TensorDataset(xv, yv), batch_size=8))
    learn = Learner(dls, tiny_cnn(seed=rank), loss_func=F.cross_entropy, metrics=accuracy, lr=1e-2, cbs=Seen(),
                    progress=False)
    with learn.distrib_ctx():
        printed, _ = fit(learn, 2)
        res['dataloader'] = dict(items=learn.seen.items, train_keys=x2[:, 0, 0, 0].tolist(), table=table(learn),
                                 checksum=checksum(learn.model), printed=printed)
        with learn.removed_cbs(learn.distributed_trainer): res['dataloader']['validate_single'] = learn.validate()

    # 3. ChannelsLast added after the learner was made, so the model is still NCHW when the fit starts (a ChannelsLast
    #    given to `Learner(cbs=...)` converts at creation): the callbacks' order decides what DDP wraps
    for case, order in (('late_right_order', None), ('wrong_order', -5)):
        learn = Learner(DataLoaders.from_tensors((x, y), bs=8), tiny_cnn(), loss_func=F.cross_entropy, progress=False)
        learn.add_cb(ChannelsLast())
        assert not cl(learn.model)
        learn.to_distributed()
        if order is not None: learn.distributed_trainer.order = order  # -5: DDP wraps before ChannelsLast (-1) converts
        _, grad_warn = fit(learn, 1)
        learn.detach_distributed()
        res[case] = dict(grad_warn=grad_warn, cl_after=cl(learn.model))

    # 4. One validation batch for two ranks: rank 1 validates nothing, and nothing may wait for it
    learn = Learner(DataLoaders(TensorBatches((x, y), bs=8, shuffle=True), TensorBatches((xv, yv), bs=40)),
                    tiny_cnn(), loss_func=F.cross_entropy, metrics=accuracy, progress=False)
    with learn.distrib_ctx():
        fit(learn, 1)
        res['one_valid_batch'] = dict(table=table(learn), checksum=checksum(learn.model))
        with learn.removed_cbs(learn.distributed_trainer): res['one_valid_batch']['validate_single'] = learn.validate()

    # 5. ChannelsLast + fp16 MixedPrecision (order 10) + DDP, with a first loss scale so large that the first steps
    #    overflow: the ranks must skip the same steps (DDP averages the scaled gradients before the scaler checks them)
    learn = Learner(DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8), tiny_cnn(seed=rank), loss_func=F.cross_entropy,
                    metrics=accuracy, lr=1e-2, progress=False, cbs=[ChannelsLast(), MixedPrecision("fp16", init_scale=2.**20)])
    with learn.distrib_ctx():
        _, grad_warn = fit(learn, 2)
        mp = learn.mixed_precision
        res['fp16'] = dict(grad_warn=grad_warn, table=table(learn), checksum=checksum(learn.model), cl_after=cl(learn.model),
                           skipped=mp.skipped_steps, scale=mp.scaler.get_scale())

    if created: teardown_distrib()
    (out / f'rank{rank}.json').write_text(json.dumps(res))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
    exit_worker()
