"""One rank of `test_compile.py::test_compile_under_ddp`, run as `torchrun --nproc_per_node 2 tests/compile_ddp_worker.py OUT`.

Each rank trains the same channels-last learner twice under `distrib_ctx` (real gloo process group, CPU): eagerly,
then with `learn.compile(backend=<recording backend>)`; it writes to `OUT/rank<r>.json` how many graphs it compiled,
what the loop ran (DDP around the compiled module), and its weights. Not collected by pytest.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from channelslast_cb.channelslast import ChannelsLast
from channelslast_cb.core import Callback
from channelslast_cb.distributed import rank_distrib, setup_distrib, teardown_distrib
from channelslast_cb.compile import model_layout
from channelslast_cb.learner import DataLoaders, Learner
from helpers import exit_worker, synth_images, tiny_cnn_no_conv_bias  # tests/ is this script's folder, so it is on sys.path


class Seen(Callback):
    "What the loop runs in each training batch: the wrapper's class, and whether the module inside runs compiled"
    order, run_valid = 12, False  # after DistributedTrainer (11): sees the wrapped model

    def before_fit(self): self.seen = set()

    def before_batch(self):
        model = self.learn.model
        inner = getattr(model, 'module', model)
        self.seen.add((type(model).__name__, inner._compiled_call_impl is not None))


class Recording:
    def __init__(self): self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(len(gm.graph.nodes))
        return gm.forward


def run(compiled: bool):
    x, y = synth_images(64, seed=0)
    xv, yv = synth_images(32, seed=1)
    dls = DataLoaders.from_tensors((x, y), valid=(xv, yv), bs=8)
    torch.manual_seed(0)
    learn = Learner(dls, tiny_cnn_no_conv_bias(seed=0), loss_func=F.cross_entropy, lr=1e-2,
                    cbs=[ChannelsLast(), Seen()], progress=False)
    rec = Recording()
    if compiled: learn.compile(backend=rec)
    with learn.distrib_ctx(): learn.fit(2)
    return learn, rec


def main(out: Path):
    torch.set_num_threads(1)
    setup_distrib(timeout=60)
    eager, _ = run(False)
    comp, rec = run(True)
    res = dict(rank=rank_distrib(), graphs=len(rec.graphs), seen=sorted(map(list, comp.seen.seen)),
               eager_seen=sorted(map(list, eager.seen.seen)), layout=model_layout(comp.model),
               model=type(comp.model).__name__, compiled_after=comp.model._compiled_call_impl is not None,
               max_diff=max((p - q).abs().max().item() for p, q in zip(comp.model.parameters(), eager.model.parameters())),
               weights=[p.detach().flatten().tolist()[:8] for p in comp.model.parameters()],
               valid_loss=comp.recorder.column('valid_loss')[-1])
    (out / f'rank{res["rank"]}.json').write_text(json.dumps(res))
    teardown_distrib()


if __name__ == '__main__':
    main(Path(sys.argv[1]))
    exit_worker()
