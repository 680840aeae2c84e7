"Small models and data shared by the tests."
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
