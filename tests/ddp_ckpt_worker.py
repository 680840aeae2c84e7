"""One rank of the DDP checkpoint checks in `test_checkpoint.py`: `torchrun --nproc_per_node 2 tests/ddp_ckpt_worker.py OUT`.

1. Each rank's learner has its own `path` (`OUT/rank<r>`) and a `SaveModelCallback(every_epoch=True)`: only rank 0's
   folder may get files. 2. Both ranks share `OUT/shared` with a best-model `SaveModelCallback`, which saves during the
   DDP fit and loads the best back on every rank at the end. 3. Rank 0's write fails: every rank raises. Writes what
   it saw to `OUT/rank<r>.json`. Not collected.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.distributed import rank_distrib, setup_distrib, teardown_distrib
from channelslast_cb.learner import DataLoaders, Learner
from ddp_worker import checksum
from helpers import exit_worker, synth_images, tiny_cnn

if __name__ == '__main__':
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    created = setup_distrib(timeout=60)
    rank = rank_distrib()
    x, y = synth_images(64, seed=0)
    xv, yv = synth_images(32, seed=1)
    res = {}
    for case, path, cb in (('own', out / f'rank{rank}', SaveModelCallback(every_epoch=True)),
                           ('shared', out / 'shared', SaveModelCallback())):
        learn = Learner(DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8), tiny_cnn(seed=rank), lr=1e-2,
                        loss_func=F.cross_entropy, path=path, cbs=[ChannelsLast(), cb], progress=False)
        with learn.distrib_ctx(): learn.fit(2)
        res[case] = dict(checksum=checksum(learn.model), saved=str(learn.save_model.last_saved_path))
    # 3. Rank 0 cannot write (OUT/blocked is a file, the test made it): every rank must raise, none may wait forever
    learn = Learner(DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8), tiny_cnn(), loss_func=F.cross_entropy,
                    path=out / 'blocked', cbs=SaveModelCallback(every_epoch=True), progress=False)
    try:
        with learn.distrib_ctx(): learn.fit(2)
        res['blocked'] = 'no error'
    except Exception as e: res['blocked'] = f'{type(e).__name__}: {e}'
    if created: teardown_distrib()
    (out / f'rank{rank}.json').write_text(json.dumps(res))
    exit_worker()
