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


class EmptiableTensorDataset(torch.utils.data.TensorDataset):
    "A `TensorDataset` that fastai's `Learner.export` can empty (`new_empty`), for export tests on tensors"
    def new_empty(self): return type(self)(*(t[:0] for t in self.tensors))


# Models a newcomer brings (issue 24): a flattening MLP, a LeNet-style `.view` after the convolutions, and two
# models that build their own 4-D input inside `forward`
class ViewMLP(nn.Module):
    "An MLP on image batches that flattens with `.view`, with a 4-D buffer (a per-pixel mean) it subtracts first"
    def __init__(self, c=3, size=8, n_out=2):
        super().__init__()
        self.register_buffer('mean', torch.zeros(1, c, size, size))
        self.l1, self.l2 = nn.Linear(c * size * size, 16), nn.Linear(16, n_out)
    def forward(self, x): return self.l2(torch.relu(self.l1((x - self.mean).view(x.size(0), -1))))


class LeNet(nn.Module):
    "Convolutions, then `x.view(-1, C*H*W)`: fails on channels-last activations"
    def __init__(self, c=3, size=8, n_out=2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.n = 6 * (size // 2) ** 2
        self.fc = nn.Linear(self.n, n_out)
    def forward(self, x):
        x = self.features(x)
        x = x.view(-1, self.n)  # the newcomer's line
        return self.fc(x)


class Spectrogram(nn.Module):
    "Takes (N, F, T) and `unsqueeze(1)`s it into a 1-channel image"
    def __init__(self, n_out=2):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, n_out)
    def forward(self, x): return self.fc(torch.relu(self.c2(torch.relu(self.c1(x.unsqueeze(1))))).mean((2, 3)))


class Uint8Net(nn.Module):
    "Takes uint8 images and normalises them inside `forward`"
    def __init__(self, c=3, n_out=2):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(c, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, n_out)
    def forward(self, x): return self.fc(torch.relu(self.c2(torch.relu(self.c1(x.float() / 255.)))).mean((2, 3)))


def as_uint8(x): return (x * 50 + 128).clamp(0, 255).to(torch.uint8)


def record_c2(model, out: list):
    "Record, per call of `model.c2` (the second convolution), whether its input and output are channels-last"
    cl = lambda t: t.is_contiguous(memory_format=torch.channels_last)
    return model.c2.register_forward_hook(lambda m, i, o: out.append((cl(i[0]), cl(o))))


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
