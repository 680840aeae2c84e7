"""Python function calls per training batch that the Learner adds over a hand-written loop: a count that does not
move with the machine's load, beside `overhead.py`'s wall-clock figure (which moves +-10 us on a shared VM).

    python benchmarks/overhead_calls.py    # same model and batches as overhead.py; one 500-batch fit, under cProfile
"""
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as o  # noqa: E402


def calls(run) -> int:
    "Function calls (primitive and recursive) made by one `run()`, after a warm-up run"
    run()
    pr = cProfile.Profile()
    pr.enable(); run(); pr.disable()
    return sum(v[1] for v in pstats.Stats(pr).stats.values())


if __name__ == '__main__':
    torch.set_num_threads(1)
    n = 500
    train, valid = o.make_batches(n), o.make_batches(1, seed=1)
    p, l = calls(o.plain_runner(train, valid)), calls(o.ours_runner(train, valid))
    print(f"function calls per batch: plain loop {p / n:.1f}, Learner {l / n:.1f}, extra {(l - p) / n:.1f}")
