"""The main job: train a small CNN on scikit-learn's bundled digits (8x8 images, 10 classes) and print the table.

Run with `make demo`. Uses only data that ships with scikit-learn, so it needs no download.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from channelslast_cb.learner import DataLoaders, Learner, accuracy


def digits_dls(bs: int = 64, seed: int = 0) -> DataLoaders:
    "The 1,797 digits as 1x8x8 float images in [0, 1], split 80/20 with a fixed seed"
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    tr, va = idx[:cut], idx[cut:]
    return DataLoaders.from_tensors((x[tr], y[tr]), valid=(x[va], y[va]), bs=bs)


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


if __name__ == "__main__":
    torch.manual_seed(0)
    learn = Learner(digits_dls(), digits_cnn(), loss_func=F.cross_entropy, metrics=accuracy)
    print("Training a small CNN on scikit-learn's digits (1,437 train / 360 valid images), fp32, contiguous:")
    learn.fit_one_cycle(5, lr_max=1e-2)
    print(f"\nfinal validation accuracy: {learn.recorder.values[-1]['accuracy']:.3f}")
