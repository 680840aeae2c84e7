"""The per-batch loop stays lean: Python function calls per training batch that the Learner adds over a hand-written
loop, counted by cProfile (a count, not a timing: it does not move with the machine's load)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import overhead as o  # noqa: E402
from overhead_calls import calls  # noqa: E402


def test_learner_adds_few_python_calls_per_batch():
    torch.set_num_threads(1)
    n = 500
    train, valid = o.make_batches(n), o.make_batches(1, seed=1)
    extra = (calls(o.ours_runner(train, valid)) - calls(o.plain_runner(train, valid))) / n
    # 16.4 on 2026-11-30 (36.4 before the lean loop): each extra call is ~0.1-0.3 us a batch
    assert 0 < extra <= 22, f"the Learner makes {extra:.1f} more Python calls per batch than a hand-written loop"
