"""The main job: train a small CNN on scikit-learn's bundled digits and print the results table.

Run with `make demo`. It trains the same model twice, contiguous in fp32 and with the one-line default
`learn.to_channelslast()` (channels-last, and the mixed precision measured fastest for this model on this machine, on
its first training steps: bf16 or fp16 where one trains it clearly faster than fp32, else fp32; kept on disk for the
next run; it says which), one epoch of each in turn, so that both runs
see the same load. It prints both tables, what was chosen, the speed of the default against contiguous fp32 (per
epoch pair, median and range), and the layout audit of the model. The data ships with scikit-learn: nothing is
downloaded.
"""
import statistics

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from channelslast_cb.all import DataLoaders, Learner, accuracy, layout_report


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


def learner() -> Learner:
    torch.manual_seed(0)
    return Learner(digits_dls(), digits_cnn(), loss_func=F.cross_entropy, metrics=accuracy)


def main(epochs: int = 6, lr: float = 3e-3):
    print("Digits from scikit-learn, upsampled to 1x16x16: 1,437 training and 360 validation images.")
    plain = learner()
    print("\nlearn.to_channelslast():")
    fast = learner().to_channelslast()  # the one line: channels-last + the precision measured fast for this model here
    runs = {'contiguous fp32': plain, 'learn.to_channelslast()': fast}
    rows = {name: [] for name in runs}
    for e in range(epochs):  # one epoch of each in turn: a load burst hits both runs alike
        for name, learn in runs.items():
            learn.recorder.print_table = False
            learn.fit(1, lr)
            rows[name].append(learn.recorder.values[-1] + [learn.recorder.times[-1]])  # losses, accuracy, seconds
    chosen = fast.mixed_precision.precision  # decided on the first epoch's first steps (or kept from an earlier run)
    for name, rs in rows.items():
        print(f"\n{name}\n  {'epoch':>5}{'train_loss':>12}{'valid_loss':>12}{'accuracy':>10}{'seconds':>9}")
        for e, (tl, vl, acc, sec) in enumerate(rs): print(f"  {e:>5}{tl:>12.4f}{vl:>12.4f}{acc:>10.3f}{sec:>9.2f}")
    # speed: per pair of epochs, the first (cold) pair left out; an epoch's time includes its validation
    t_plain, t_fast = ([r[-1] for r in rs[1:]] for rs in rows.values())
    pairs = [a / b for a, b in zip(t_plain, t_fast)]
    speed, lo, hi = statistics.median(pairs), min(pairs), max(pairs)
    verdict = "faster" if lo > 1 else "not slower, within the noise of this machine" if hi >= 1 else "slower"
    print(f"\nlearn.to_channelslast() chose channels-last + {chosen} on this machine and ran at {speed:.2f}x the speed "
          f"of contiguous fp32 (median of {len(pairs)} paired epochs; range {lo:.2f}-{hi:.2f}x): {verdict}. Final "
          f"accuracy {rows['contiguous fp32'][-1][2]:.3f} (fp32) and {list(rows.values())[1][-1][2]:.3f}.")
    x, _ = next(iter(digits_dls().train))
    report = layout_report(digits_cnn(), x[:8], backward=True)
    print(f"\nlayout audit of the model in channels-last: {len(report.breaks)} module(s) where the format breaks, "
          f"{report.n_copies} layout-changing copies per training step")


if __name__ == "__main__":
    main()
