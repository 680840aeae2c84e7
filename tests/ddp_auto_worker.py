"""One rank of `test_auto_precision.py`'s DDP checks, run as `torchrun --nproc_per_node 2 tests/ddp_auto_worker.py OUT`.

Each rank's probe is seeded so that, alone, rank 0 would train in bf16 and rank 1 in fp32 (its probe rules bf16
out), and each rank's step clock is injected with its own costs. Under DDP both must take one decision:
1. `MixedPrecision()` ('auto'): rank 0's candidates, timed on real steps by every rank, one precision;
2. `ChannelsLast(auto=True)` + `MixedPrecision()`: rank 0's candidates, timings averaged over the ranks, one setting.
Each rank writes what it saw to `OUT/rank<r>.json`. Not collected by pytest.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import channelslast_cb.fp16 as fp16
from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.distributed import as_timeout  # noqa: F401 (also gives Learner its distrib_ctx)
from channelslast_cb.fp16 import AMPMode, AMPSpeed, MixedPrecision, candidate_settings, decide_amp
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn_no_conv_bias  # tests/ is this script's folder, so it is on sys.path

PROBE = {0: dict(bf16=.8, fp16=5.), 1: dict(bf16=3.1, fp16=5.3)}  # rank 1 alone: no 16-bit mode is timed
# seconds per step by (layout, precision), per rank: averaged, channels-last bf16 (8.5 ms) beats fp32 (10 ms)
COST = {0: {('channels_last', 'bf16'): .005, ('contiguous', 'bf16'): .006, ('channels_last', 'fp32'): .010,
            ('contiguous', 'fp32'): .011},
        1: {('channels_last', 'bf16'): .012, ('contiguous', 'bf16'): .013, ('channels_last', 'fp32'): .010,
            ('contiguous', 'fp32'): .011}}


def make_learner(cbs):
    learn = Learner(DataLoaders.from_tensors(synth_images(128), bs=4), tiny_cnn_no_conv_bias(), loss_func=F.cross_entropy,
                    cbs=cbs, progress=False)
    learn.recorder.print_table = False
    return learn


def main(out: Path):
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    fp16.SAY_CHOICES = False
    fp16.AMP_SPEEDS.update({('cpu', AMPMode(m)): AMPSpeed('cpu', AMPMode(m), r) for m, r in PROBE[rank].items()})
    res = dict(alone=decide_amp('cpu').precision, candidates_alone=[str(s) for s in candidate_settings('cpu')[0]])
    learn = make_learner(mp := MixedPrecision())
    t0 = [0.]
    def mp_clock():
        t0[0] += COST[rank]['contiguous', mp.precision] / 2
        return t0[0]
    mp._clock = mp_clock
    with learn.distrib_ctx(timeout=60):
        learn.fit(1)
        res['default'] = learn.mixed_precision.precision
    cb = ChannelsLast(auto=True, warmup=1, block=1, rounds=2)
    learn = make_learner([cb, MixedPrecision()])
    t = [0.]
    def clock():
        t[0] += COST[rank][cb.layout, learn.mixed_precision.precision] / 2
        return t[0]
    cb._clock = clock
    with learn.distrib_ctx(timeout=60):
        learn.fit(1)
    d = cb.decision
    res.update(auto=dict(kept=str(d.setting), timed=[str(r['setting']) for r in d.table],
                         dropped=[r['dropped_after'] for r in d.table]),
               precision=learn.mixed_precision.precision,
               weights=[p.detach().double().sum().item() for p in learn.model.parameters()])
    (out / f'rank{rank}.json').write_text(json.dumps(res))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
    exit_worker()
