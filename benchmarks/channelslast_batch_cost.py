"""Cost of ChannelsLast's per-batch input conversion (the hot path), in microseconds.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/channelslast_batch_cost.py

Prints the median over repeats of the per-call time of the conversion `ChannelsLast.before_batch` applies to
`learn.xb`, and of the same function on a whole `(x, y)` batch, for an input already channels-last (the pure
overhead) and for one arriving in the default layout (one copy).
"""
import platform
import statistics
import timeit

import torch

from channelslast_cb.channelslast import _cl_batch


def per_call_us(f, number, repeat=7):
    return statistics.median(timeit.repeat(f, number=number, repeat=repeat)) / number * 1e6


def main():
    x = torch.randn(16, 3, 128, 128)
    y = torch.randint(0, 10, (16,))
    xc = x.contiguous(memory_format=torch.channels_last)
    rows = [
        ('(x, y), x already channels-last', lambda: _cl_batch((xc, y)), 100_000),
        ('xb = (x,), x already channels-last', lambda: _cl_batch((xc,)), 100_000),
        ('(x, y), x 16x3x128x128 float32 contiguous (one copy)', lambda: _cl_batch((x, y)), 500),
    ]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    for name, f, n in rows: print(f"{name:<55} {per_call_us(f, n):9.2f} us")


if __name__ == '__main__': main()
