"""The main job: train a small CNN on scikit-learn's bundled digits and print the results table.

Run with `make demo`. It trains the same model twice, first contiguous in fp32, then with
`learn.to_channelslast(amp_mode='bf16')` (channels-last + bfloat16 autocast on this CPU), prints both tables
and the layout audit of the model. The data ships with scikit-learn, so nothing is downloaded.
"""
import statistics

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from channelslast_cb.audit import layout_report
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.fp16 import MixedPrecision, check_amp_support
from channelslast_cb.learner import DataLoaders, Learner, accuracy


def digits_dls(bs: int = 64, seed: int = 0, size: int = 16) -> DataLoaders:
    "The 1,797 digits as 1x`size`x`size` float images in [0, 1], split 80/20 with a fixed seed"
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.
    if size != 8: x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    tr, va = idx[:cut], idx[cut:]
    return DataLoaders.from_tensors((x[tr], y[tr]), valid=(x[va], y[va]), bs=bs)


def digits_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(title: str, to_channelslast: bool, epochs: int = 5) -> Learner:
    torch.manual_seed(0)
    learn = Learner(digits_dls(), digits_cnn(), loss_func=F.cross_entropy, metrics=accuracy)
    if to_channelslast: learn.to_channelslast(amp_mode='bf16')
    cbs = ', '.join(type(cb).__name__ for cb in learn.cbs if isinstance(cb, (ChannelsLast, MixedPrecision))) or 'none'
    print(f"\n{title}  (extra callbacks: {cbs})")
    learn.fit_one_cycle(epochs, lr_max=1e-2)
    return learn


if __name__ == "__main__":
    print("Digits from scikit-learn, upsampled to 1x16x16: 1,437 training and 360 validation images.")
    fp32 = train("1. contiguous, float32", to_channelslast=False)
    try:
        check_amp_support('bf16', 'cpu')
        cl = train("2. learn.to_channelslast(amp_mode='bf16'): channels-last + bfloat16 autocast", to_channelslast=True)
    except RuntimeError as e:
        cl = None
        print(f"\n2. skipped channels-last + bf16: {e}")
    print("\nresults")
    print(f"  {'run':<34}{'valid accuracy':>16}{'median s/epoch':>16}")
    for name, learn in (("contiguous fp32", fp32), ("channels-last bf16", cl)):
        if learn is None: continue
        rec = learn.recorder
        # the median epoch, so that the first (cold) epoch of the first run does not weigh on the comparison
        print(f"  {name:<34}{rec.column('accuracy')[-1]:>16.3f}{statistics.median(rec.times):>16.2f}")
    x, _ = next(iter(digits_dls().train))
    report = layout_report(digits_cnn(), x[:8], backward=True)
    print(f"\nlayout audit of the model in channels-last: {len(report.breaks)} module(s) where the format breaks, "
          f"{report.n_copies} layout-changing copies per training step")
