"""One rank of the DDP fault checks in `test_bad_input.py`, run as `torchrun --nproc_per_node 2 tests/ddp_badinput_worker.py OUT`.

1. `ChannelsLast(auto=True)` under DDP with each rank's step timings injected so that, alone, rank 0 would keep
   channels-last and rank 1 contiguous: every rank must end in one layout.
2. `distrib_ctx(timeout=10)` with rank 1 frozen (in the group, but it never joins a collective again): rank 0's
   next fit must fail within seconds, not torch's default 30 minutes.
Each rank writes what it saw to `OUT/rank<r>.json`. Not collected by pytest.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.channelslast import CHANNELS_LAST, CONTIGUOUS, ChannelsLast
from channelslast_cb.distributed import as_timeout  # noqa: F401 (also gives Learner its distrib_ctx)
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn  # tests/ is this script's folder, so it is on sys.path

# Seconds per step in each layout, per rank: alone, rank 0 finds channels-last 2x faster, rank 1 finds it 3x slower;
# averaged over the ranks contiguous wins (2.0 ms vs 1.5 ms)
COST = {0: {CHANNELS_LAST: 1e-3, CONTIGUOUS: 2e-3}, 1: {CHANNELS_LAST: 3e-3, CONTIGUOUS: 1e-3}}


class InjectedClock:
    "A clock that advances by this rank's cost of the layout `cb` is in at each reading (so a timed step lasts that long)"
    def __init__(self, cb, cost): self.cb, self.cost, self.t = cb, cost, 0.
    def __call__(self):
        now, self.t = self.t, self.t + self.cost[self.cb.layout]
        return now


def cl(model): return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


TIMEOUT = 10  # seconds: how long a collective waits for a stuck rank (torch's default is 30 minutes)


def main(out: Path):
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    x, y = synth_images(64, seed=0)
    cb = ChannelsLast(auto=True, warmup=0, block=1, rounds=2)
    cb._clock = InjectedClock(cb, COST[rank])
    learn = Learner(DataLoaders.from_tensors((x, y), bs=4), tiny_cnn(), loss_func=F.cross_entropy, cbs=cb, progress=False)
    learn.recorder.print_table = False
    done = out / 'rank0_done'
    with learn.distrib_ctx(timeout=TIMEOUT):  # one process group for both checks (a new one per check is slow to form)
        # 1. the automatic layout choice under DDP
        learn.fit(1)
        other = next(r for r in cb.decision.table if not r['kept'])
        res = dict(auto=dict(layout=cb.layout, decision=cb.decision.layout, vs_kept=other['vs_kept'],
                             dropped=[r['dropped_after'] for r in cb.decision.table],
                             model_cl=cl(learn.model), alone=min(COST[rank], key=COST[rank].get)))  # alone: this rank's own choice
        # 2. rank 1 freezes: in the group, but never in a collective again, until rank 0 has its answer (or 120 s)
        t0 = time.monotonic()
        if rank == 0:
            try: learn.fit(1)  # DDP's wrap alone needs rank 1 (it checks and broadcasts the parameters)
            except Exception as e: res['frozen'] = dict(error=type(e).__name__, message=str(e)[:300])
            res.setdefault('frozen', {})['elapsed'] = time.monotonic() - t0
        else:
            while not done.exists() and time.monotonic() - t0 < 120: time.sleep(0.1)
            res['frozen'] = dict(waited=time.monotonic() - t0)
        (out / f'rank{rank}.json').write_text(json.dumps(res))
        if rank == 0: done.touch()
        exit_worker()  # the group is broken now: skip the teardown (it could wait on the other rank)


if __name__ == '__main__':
    main(Path(sys.argv[1]))
