"""Train the digits CNN of `make demo` with DDP on two processes, in channels-last.

    torchrun --nproc_per_node 2 examples/ddp_digits.py

Every process builds the same learner; `distrib_ctx` sets up the process group from torchrun's environment and
adds `DistributedTrainer`, which wraps the (already channels-last) model in `DistributedDataParallel`, gives each
process half of the training batches and makes every process report the results of the whole validation set.
Only rank 0 prints. Run with plain `python`, the script trains in one process (and `distrib_ctx` warns).
"""
import torch.nn.functional as F
from digits import digits_cnn, digits_dls  # examples/digits.py, next to this script

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.distributed import num_distrib, rank_distrib
from channelslast_cb.learner import Learner, accuracy

if __name__ == "__main__":
    n_proc = max(num_distrib(), 1)  # torchrun's WORLD_SIZE (0 outside torchrun)
    # The global batch of `make demo`, 64 images per step, split between the processes: each takes 64 / n_proc.
    # DDP averages the gradients over the processes, so a step sees all 64, as in one process.
    dls = digits_dls(bs=64 // n_proc)
    learn = Learner(dls, digits_cnn(seed=0), loss_func=F.cross_entropy, metrics=accuracy, cbs=ChannelsLast())
    if rank_distrib() == 0:
        print(f"Training the digits CNN in channels-last on {n_proc} process(es), {64 // n_proc} images each per step:")
    with learn.distrib_ctx():
        learn.fit_one_cycle(3, lr_max=1e-2)
    if rank_distrib() == 0:
        print(f"\nfinal validation accuracy: {learn.recorder.column('accuracy')[-1]:.3f}")
