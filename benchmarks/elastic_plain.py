"""The baseline of issue 20: plain torch under `torchrun --max-restarts 1`, rank 1 SIGKILLed once. Run by elastic_restarts.py."""
import datetime, os, signal, sys
import torch, torch.distributed as dist

dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=30))  # torch's env:// rendezvous, as documented
rank, t = dist.get_rank(), torch.ones(1)
dist.all_reduce(t)
mark = os.path.join(sys.argv[1], 'killed')
if rank == 1 and not os.path.exists(mark):
    open(mark, 'w').close()
    os.kill(os.getpid(), signal.SIGKILL)  # a lost process
dist.all_reduce(t)
print(f'rank {rank} done: {t.item():g}', flush=True)
dist.destroy_process_group()
