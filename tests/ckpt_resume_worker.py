"""Train, or resume from a checkpoint, in a fresh process: the exact-resume checks of `test_checkpoint.py`.

`python tests/ckpt_resume_worker.py full OUT` trains each configuration for 4 one-cycle epochs, saving every epoch
with `SaveModelCallback(every_epoch=True, with_opt=True)`, and writes the final weights to `OUT/<cfg>_full.pt`.
`python tests/ckpt_resume_worker.py resume OUT` starts from other random weights and other RNG seeds, loads the
checkpoint of epoch 1, resumes with `start_epoch=2`, and writes `OUT/<cfg>_resumed.pt`; then the same once more with
the RNGs reseeded after the load (`OUT/<cfg>_reseeded.pt`), which must differ. Not collected by pytest.
"""
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.checkpoint import SaveModelCallback
from channelslast_cb.core import Callback
from channelslast_cb.fp16 import MixedPrecision
from channelslast_cb.learner import DataLoaders, Learner, accuracy
from helpers import synth_images  # tests/ is this script's folder, so it is on sys.path

CONFIGS = ('fp32', 'cl_bf16')


class Jitter(Callback):
    "Noise on the inputs drawn from Python's and NumPy's generators, so a resume must restore them too"
    order = -5  # before ChannelsLast (-1) converts the batch
    def before_batch(self):
        s = random.random() * 0.1 + float(np.random.rand()) * 0.1
        self.learn.xb = (self.learn.xb[0] * (1 + s),)


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),  # dropout: torch RNG
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def learner(cfg, out, seed):
    torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)
    x, y = synth_images(64, seed=0)
    xv, yv = synth_images(32, seed=1)
    cbs = [Jitter()] + ([ChannelsLast(), MixedPrecision('bf16')] if cfg == 'cl_bf16' else [])
    return Learner(DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=16, shuffle=True), cnn(),
                   loss_func=F.cross_entropy, metrics=accuracy, path=out, cbs=cbs, progress=False)


def weights(learn): return {k: v.detach().float().contiguous().clone() for k, v in learn.model.state_dict().items()}


if __name__ == '__main__':
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    for cfg in CONFIGS:
        if mode == 'full':
            learn = learner(cfg, out, seed=0)
            learn.fit_one_cycle(4, lr_max=1e-2, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname=cfg))
            torch.save(weights(learn), out / f'{cfg}_full.pt')
        else:
            learn = learner(cfg, out, seed=1).load(f'{cfg}_1')
            assert learn.epoch == 1, learn.epoch
            learn.fit_one_cycle(4, lr_max=1e-2, start_epoch=learn.epoch + 1)
            torch.save(weights(learn), out / f'{cfg}_resumed.pt')
            learn = learner(cfg, out, seed=1).load(f'{cfg}_1')
            torch.manual_seed(1); random.seed(1); np.random.seed(1)
            learn.fit_one_cycle(4, lr_max=1e-2, start_epoch=2)
            torch.save(weights(learn), out / f'{cfg}_reseeded.pt')
