"Small models and data shared by the tests, and how a torchrun worker ends."
import os
import sys

import torch
from torch import nn


def synth_images(n=64, c=3, size=8, n_classes=2, seed=0):
    "Random images whose class is decided by the sign of their mean (learnable by a tiny CNN)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long() % n_classes


def tiny_cnn(c_in=3, n_out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, n_out))


def tiny_cnn_no_conv_bias(seed=0):
    """`tiny_cnn` without the bias of the convolution that feeds BatchNorm. BatchNorm cancels that bias, so its true
    gradient is 0 and what backward computes is rounding noise, different in each layout; Adam's normalised step
    turns any such noise into a step of about `lr`, so that one parameter would differ by ~lr per step between two
    runs that agree everywhere else to 1e-8. (It is dead weight in the model anyway.)"""
    m = tiny_cnn(seed=seed)
    m[0].register_parameter('bias', None)
    return m


def exit_worker(code: int = 0):
    """End a torchrun worker once its results are written: flush, then `os._exit(code)`, skipping Python's finalization.

    A gloo group that DDP used keeps its worker threads after `destroy_process_group` (DDP holds a reference), and one
    of them may still be releasing the last allreduce when the interpreter finalizes. That release needs the GIL, a
    finalizing Python ends the thread instead, and the C++ runtime aborts the process: "terminate called without an
    active exception", SIGABRT, exit -6 (gdb: `ProcessGroupGloo::runLoop` -> `~AsyncAllreduceWork` ->
    `gil_scoped_acquire` -> `pthread_exit` while the main thread is in `Py_FinalizeEx`). It is a race that load makes
    likely (about one launch in eight on a busy 2-core machine); PyTorch issue #190489 and PR #179291 describe it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
