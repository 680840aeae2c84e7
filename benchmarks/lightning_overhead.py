"""Per-batch cost of `channelslast_cb.lightning.ChannelsLast` against the same conversion written by hand in the
LightningModule, both on Lightning's own `Trainer` (channels-last, fp32, CPU, one thread).

    python benchmarks/lightning_overhead.py                          # 500 batches, 9 interleaved rounds
    python benchmarks/lightning_overhead.py --batches 50 --repeats 2  # does it run?

The variants train the same tiny model (1x1 conv + linear on 8x3x4x4 batches, so the loop itself dominates) on the
same ready-made batches:
- `by_hand`: the LightningModule converts its net in `__init__` and each batch in `on_after_batch_transfer`, the
  conversion users write today;
- `callback`: the plain LightningModule with `Trainer(callbacks=[ChannelsLast()])`;
- `by_hand_empty_cb`: `by_hand` plus a Callback that does nothing. Lightning calls every hook of every callback
  (six per training batch, each inside its profiler's context manager), whatever the callback overrides: any
  callback pays that. `callback - by_hand_empty_cb` is what our callback's own code costs.

Each round fits each variant once with a new Trainer (the starting variant rotating from round to round) and times
its epoch from `on_train_epoch_start` to `on_train_epoch_end`, so the Trainer's set-up is left out. Reported: the
median epoch time per batch of each variant, and the median over the rounds of the paired per-round difference
(callback - by_hand) per batch: the callback's cost, Lightning's dispatch of its hooks included. The goal (issue 19):
at most 10 us per batch.
"""
import argparse
import gc
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from channelslast_cb.lightning import ChannelsLast

logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
warnings.filterwarnings('ignore', message=r'.*(does not have many workers|LeafSpec)')


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


class Plain(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def training_step(self, batch, i): return F.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self): return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ByHand(Plain):
    "The conversion as users write it: the net in `__init__`, each batch after it reached the device"
    def __init__(self):
        super().__init__()
        self.net = self.net.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y


class Batches:
    "Ready-made batches as the train loader (no collation to time)"
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)
    def __len__(self): return len(self.batches)


class EpochTimer(Callback):
    "The epoch's wall time: every batch's fetch, transfer, conversion and step, none of the Trainer's set-up"
    def on_train_epoch_start(self, trainer, pl_module): self.t0 = time.perf_counter()
    def on_train_epoch_end(self, trainer, pl_module): self.seconds = time.perf_counter() - self.t0


def fit_once(variant: str, batches) -> float:
    timer = EpochTimer()
    model, cbs = {'by_hand': lambda: (ByHand(), [timer]), 'by_hand_empty_cb': lambda: (ByHand(), [Callback(), timer]),
                  'callback': lambda: (Plain(), [ChannelsLast(), timer])}[variant]()
    t = Trainer(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=cbs)
    t.fit(model, Batches(batches))
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    return timer.seconds


def overhead(n_batches=500, repeats=9):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n_batches)]
    names = ['by_hand', 'callback', 'by_hand_empty_cb']
    for k in names: fit_once(k, batches[:20])  # warm-up: imports, oneDNN kernels, Lightning's first-use costs
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % 3:] + names[:r % 3]:
            gc.collect()
            times[k].append(fit_once(k, batches))
    per_batch = {k: statistics.median(v) / n_batches * 1e6 for k, v in times.items()}
    diff = lambda a, b: [(x - y) / n_batches * 1e6 for x, y in zip(times[a], times[b])]
    return per_batch, {'callback - by_hand': diff('callback', 'by_hand'),
                       'callback - by_hand_empty_cb': diff('callback', 'by_hand_empty_cb'),
                       'by_hand_empty_cb - by_hand': diff('by_hand_empty_cb', 'by_hand')}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=500, help='batches per timed epoch')
    p.add_argument('--repeats', type=int, default=9, help='interleaved rounds; medians are reported')
    a = p.parse_args()
    import lightning
    per_batch, diffs = overhead(a.batches, a.repeats)
    print(f"{a.batches} batches of 8x3x4x4, channels-last fp32, CPU, 1 thread, {a.repeats} interleaved rounds "
          f"(torch {torch.__version__}, lightning {lightning.__version__})")
    for k, us in per_batch.items(): print(f"  {k:<28} {us:8.1f} us/batch (median epoch)")
    for k, d in diffs.items():
        print(f"  {k:<28} {statistics.median(d):+8.1f} us/batch (median of paired rounds: {', '.join(f'{x:+.1f}' for x in d)})")


if __name__ == '__main__': main()
