"""Save a ~100 MB model in a loop with `Learner.save`, for `test_checkpoint.py` to SIGKILL at varied moments.

Run as `python tests/ckpt_saver.py FOLDER`. Before save `i` it prints `saving i`, after it `saved i SECONDS`; every
weight of save `i` equals `i`, so a reader can tell which save a file holds and that it is whole. Not collected by pytest.
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.learner import DataLoaders, Learner

if __name__ == '__main__':
    torch.set_num_threads(1)
    model = nn.Linear(5000, 5000)  # 25M float32 parameters: 100 MB
    learn = Learner(DataLoaders([(torch.zeros(1, 5000), torch.zeros(1, dtype=torch.long))]), model,
                    loss_func=F.cross_entropy, path=sys.argv[1], progress=False)
    for i in range(1, 1000):
        with torch.no_grad():
            for p in model.parameters(): p.fill_(float(i))
        print(f'saving {i}', flush=True)
        t = time.perf_counter()
        learn.save('big', with_opt=False)
        print(f'saved {i} {time.perf_counter() - t:.4f}', flush=True)
