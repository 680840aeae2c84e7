"""One rank of the DDP exact-resume check in `test_checkpoint.py`: `torchrun --nproc_per_node 2 tests/ddp_resume_worker.py OUT`.

Trains 3 one-cycle epochs under DDP on shuffled batches, saving every epoch with `SaveModelCallback(every_epoch=True,
with_opt=True)`; then a new learner, with other random weights and other seeds, loads epoch 0's checkpoint and resumes
with `start_epoch=1`. Writes both final weights to `OUT/rank<r>.pt`. Not collected.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.distributed import rank_distrib, setup_distrib, teardown_distrib
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn_no_conv_bias


def learner(out, seed):
    x, y = synth_images(96, seed=0)
    xv, yv = synth_images(32, seed=1)
    return Learner(DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8, shuffle=True), tiny_cnn_no_conv_bias(seed=seed),
                   loss_func=F.cross_entropy, path=out, progress=False)


def weights(learn): return {k: v.detach().contiguous().clone() for k, v in learn.model.state_dict().items()}


if __name__ == '__main__':
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    created = setup_distrib(timeout=60)
    rank = rank_distrib()
    learn = learner(out, seed=0)
    with learn.distrib_ctx():
        learn.fit_one_cycle(3, lr_max=1e-2, cbs=SaveModelCallback(every_epoch=True, with_opt=True))
    full = weights(learn)
    resumed = learner(out, seed=10 + rank)
    resumed.load('model_0', with_opt=True)
    with resumed.distrib_ctx(): resumed.fit_one_cycle(3, lr_max=1e-2, start_epoch=1)
    if created: teardown_distrib()
    torch.save({'full': full, 'resumed': weights(resumed)}, out / f'rank{rank}.pt')
    exit_worker()
