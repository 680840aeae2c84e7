"""Train the digits CNN on two processes so that a lost process costs an epoch, not the run.

    torchrun --nproc-per-node 2 --max-restarts 3 examples/elastic_digits.py
    torchrun --nproc-per-node 2 --max-restarts 3 examples/elastic_digits.py --kill-rank1-in-epoch 2   # watch a restart

The same script is the first run and every restart. `SaveModelCallback(every_epoch=True, with_opt=True,
autoresume=True)` saves a checkpoint after each epoch and, when the fit starts, continues from the newest one in
`--path` (none: a fresh start). When a process dies, torchrun stops the others and starts the script again (up to
`--max-restarts` times); `distrib_ctx` forms a new process group that no earlier attempt's keys can disturb, and
the fit continues at the epoch after the last checkpoint. `--kill-rank1-in-epoch E` makes rank 1 SIGKILL itself
in epoch E, once, to see it happen. A finished run's folder stays: run again with the same `--path`, the script
finds the last epoch's checkpoint and trains nothing (use a new `--path` for a new run).
"""
import argparse
import os
import signal
from pathlib import Path

import torch.nn.functional as F
from digits import digits_cnn, digits_dls  # examples/digits.py, next to this script

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.core import Callback
from channelslast_cb.distributed import num_distrib, rank_distrib
from channelslast_cb.learner import Learner, accuracy


class KillRank1(Callback):
    "Simulate a lost process: rank 1 SIGKILLs itself after the second batch of epoch `epoch`, the first time only"
    def __init__(self, epoch: int, mark: Path):
        super().__init__()
        self.epoch, self.mark = epoch, mark

    def after_batch(self):
        if rank_distrib() != 1 or not self.learn.training or (self.learn.epoch, self.learn.iter) != (self.epoch, 1): return
        if self.mark.exists(): return  # killed once already: this is the restarted run
        self.mark.write_text('killed\n')
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--path', default='elastic_digits_run', help='folder of the checkpoints (models/ inside)')
    ap.add_argument('--kill-rank1-in-epoch', type=int, default=None, help='rank 1 dies in this epoch, once')
    args = ap.parse_args()
    n_proc, path = max(num_distrib(), 1), Path(args.path)
    cbs = [ChannelsLast(), SaveModelCallback(every_epoch=True, with_opt=True, autoresume=True)]
    if args.kill_rank1_in_epoch is not None: cbs.append(KillRank1(args.kill_rank1_in_epoch, path / 'killed_rank1'))
    # 64 images per step in all, as in `make demo`; the same initial weights on every rank and in every restart
    learn = Learner(digits_dls(bs=64 // n_proc), digits_cnn(seed=0), loss_func=F.cross_entropy, metrics=accuracy,
                    path=path, cbs=cbs)
    if rank_distrib() == 0:
        print(f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)} on {n_proc} process(es), checkpoints in {path / 'models'}")
    with learn.distrib_ctx(timeout=120):  # a process that cannot join the group is an error after 2 minutes
        learn.fit_one_cycle(4, lr_max=1e-2)
    if rank_distrib() == 0:
        print(f"\nfinal validation accuracy: {learn.validate()[1]:.3f}")
