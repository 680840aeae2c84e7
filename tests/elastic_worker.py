"""One rank of the elastic-restart checks: `torchrun --nproc-per-node 2 --max-restarts N tests/elastic_worker.py OUT [KILL ...]`.

The same script is the first attempt and every restart, as a user's would be: a channels-last fp32 learner with
`SaveModelCallback(every_epoch=True, with_opt=True, autoresume=True)` trains 4 one-cycle epochs on shuffled batches
inside `learn.distrib_ctx()`. Each KILL is `rank:epoch:batch`: that rank SIGKILLs itself after that training batch,
once, and only after the KILLs before it happened (marker files in OUT say which did, whatever node or restart count
the process has). The attempt that finishes then trains the same learner from scratch in an empty folder (a fresh
start, nothing killed: the uninterrupted run) in the same process group, and writes `OUT/rank<r>.pt`.
`tests/test_elastic.py` and `benchmarks/elastic_restarts.py` run it. Not collected.

`OUT ABSENT=<rank>` instead: that rank never joins (it sleeps), to check that the other one fails within the timeout.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.core import Callback
from channelslast_cb.distributed import rank_distrib, setup_distrib
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn_no_conv_bias

N_EPOCH, TIMEOUT = 4, 30


class Kill(Callback):
    "SIGKILL this process after batch `batch` of epoch `epoch` if it is rank `rank` and the kills before it happened"
    order = 100

    def __init__(self, out: Path, i: int, rank: int, epoch: int, batch: int):
        super().__init__()
        self.out, self.i, self.rank, self.epoch, self.batch = out, i, rank, epoch, batch

    def after_batch(self):
        if not self.learn.training or (rank_distrib(), self.learn.epoch, self.learn.iter) != (self.rank, self.epoch, self.batch): return
        mark = self.out / f'killed_{self.i}'
        if mark.exists() or any(not (self.out / f'killed_{j}').exists() for j in range(self.i)): return
        with open(mark, 'w') as f:
            f.write(f'rank {self.rank}, epoch {self.epoch}, batch {self.batch}, pid {os.getpid()}\n')
            f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # a lost process: no clean-up, no exception, no atexit


def learner(path: Path, cbs=()) -> Learner:
    x, y = synth_images(96, seed=0)
    xv, yv = synth_images(32, seed=1)
    dls = DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8, shuffle=True)
    return Learner(dls, tiny_cnn_no_conv_bias(seed=0), loss_func=F.cross_entropy, path=path, progress=False,
                   cbs=[ChannelsLast(), SaveModelCallback(every_epoch=True, with_opt=True, autoresume=True), *cbs])


def train(learn: Learner) -> Learner:
    with learn.distrib_ctx(timeout=TIMEOUT):
        learn.fit_one_cycle(N_EPOCH, lr_max=1e-2)
    return learn


def weights(learn): return {k: v.detach().contiguous().clone() for k, v in learn.model.state_dict().items()}


if __name__ == '__main__':
    torch.set_num_threads(1)
    out, plan = Path(sys.argv[1]), sys.argv[2:]
    if plan and plan[0].startswith('ABSENT='):
        if int(os.environ['RANK']) == int(plan[0].split('=')[1]): time.sleep(120)  # never joins (torchrun stops it)
        else: setup_distrib(timeout=float(plan[1]) if len(plan) > 1 else 5)
        sys.exit(0)
    kills = [Kill(out, i, *map(int, k.split(':'))) for i, k in enumerate(plan)]
    run = train(learner(out / 'run', kills))
    ref = train(learner(out / 'ref'))  # the uninterrupted run: an empty folder, so a fresh start
    rank = rank_distrib()
    torch.save({'resumed': weights(run), 'reference': weights(ref),
                'resumed_from': str(run.save_model.resumed_from), 'ref_resumed_from': str(ref.save_model.resumed_from),
                'epochs_run': len(run.recorder.values), 'restart_count': int(os.environ['TORCHELASTIC_RESTART_COUNT']),
                'group_rank': int(os.environ['GROUP_RANK'])}, out / f'rank{rank}.pt')
    print(f'rank {rank}: done, resumed from {run.save_model.resumed_from}', flush=True)
    exit_worker()
