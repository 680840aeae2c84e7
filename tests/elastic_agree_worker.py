"""One rank of `test_every_rank_resumes_from_rank0s_choice`: `torchrun --nproc-per-node 2 tests/elastic_agree_worker.py OUT`.

Each rank has its own checkpoint folder, `OUT/r<rank>/models`, with different checkpoints in it: rank 0 `model_0` and
`model_1`, rank 1 `model_0` to `model_2` (as if the folder were not shared between two nodes). Then:

1. a fit with `autoresume=True` under DDP: rank 0 chooses, so both ranks must resume from rank 0's `model_1`;
2. the same with rank 1's learner on another optimizer (SGD, the checkpoint holds AdamW's state): rank 1 cannot
   load the file, and both ranks must raise, instead of rank 0 training on and waiting for rank 1 in DDP.

Writes what each rank saw to `OUT/rank<r>.json`. Not collected.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import channelslast_cb.distributed  # noqa: F401  (adds learn.distrib_ctx)
from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.checkpoint_io import atomic_save, learner_state
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn_no_conv_bias


def learner(path: Path, opt_func=torch.optim.AdamW) -> Learner:
    return Learner(DataLoaders.from_tensors(synth_images(32), bs=8), tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy,
                   opt_func=opt_func, path=path, progress=False,
                   cbs=SaveModelCallback(every_epoch=True, with_opt=True, autoresume=True, monitor='train_loss'))


if __name__ == '__main__':
    torch.set_num_threads(1)
    out, rank = Path(sys.argv[1]), int(os.environ['RANK'])
    own = out / f'r{rank}'
    learn = learner(own).create_opt()
    for k in range(2 + rank):  # written directly: before the group exists, `Learner.save` writes on rank 0 only
        atomic_save(learner_state(learn.model, learn.opt, learn.cbs, k), own / 'models' / f'model_{k}.pth')
    seen = {}
    learn = learner(own)
    with learn.distrib_ctx(timeout=30):
        learn.fit(4, lr=1e-3)
    seen['resumed_from'], seen['epochs_run'] = str(learn.save_model.resumed_from), len(learn.recorder.values)
    learn = learner(own, torch.optim.SGD if rank == 1 else torch.optim.AdamW)
    try:
        with learn.distrib_ctx(timeout=30): learn.fit(4, lr=1e-3)
        seen['error'] = None
    except Exception as e: seen['error'] = f'{type(e).__name__}: {e}'
    (out / f'rank{rank}.json').write_text(json.dumps(seen))
    exit_worker()
