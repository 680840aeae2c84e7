"LightningModules, loaders and a quiet Trainer shared by `test_lightning.py` and `lightning_ddp_worker.py`."
import hashlib
import logging
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import synth_images, tiny_cnn_no_conv_bias

logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)  # "GPU available: False", tips, "fit stopped"
warnings.filterwarnings('ignore', message=r'.*does not have many workers')
warnings.filterwarnings('ignore', message=r'.*LeafSpec')


def cl(t: torch.Tensor) -> bool:
    "Whether a 4-D (5-D) tensor is channels-last (3d)"
    return t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


class Classifier(LightningModule):
    """A classifier whose steps call `self.net(x)` (not `self(x)`), as most LightningModules do. A hook on the first
    convolution records, per call, (stage, whether its input is channels-last); `on_after_backward` keeps the first
    step's gradients."""
    def __init__(self, net=None, lr=1e-2, opt='adam'):
        super().__init__()
        self.net = net if net is not None else tiny_cnn_no_conv_bias()
        self.lr, self.opt, self.seen, self.first_grads = lr, opt, [], None
        conv = next(m for m in self.net.modules() if isinstance(m, nn.modules.conv._ConvNd))
        conv.register_forward_pre_hook(lambda m, args: self.seen.append(
            (self._trainer.state.stage.value if self._trainer is not None else None, cl(args[0]))))

    def training_step(self, batch, i): return F.cross_entropy(self.net(batch[0]), batch[1])
    def validation_step(self, batch, i): self.log('valid_loss', F.cross_entropy(self.net(batch[0]), batch[1]))
    def test_step(self, batch, i): self.log('test_loss', F.cross_entropy(self.net(batch[0]), batch[1]))
    def predict_step(self, batch, i): return self.net(batch[0])

    def on_after_backward(self):
        if self.first_grads is None:
            self.first_grads = {k: p.grad.detach().clone() for k, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.opt == 'adam' else torch.optim.SGD
        return cls(self.parameters(), lr=self.lr)


def loader(n=32, seed=0, bs=8, size=8, shuffle=False):
    return DataLoader(TensorDataset(*synth_images(n, size=size, seed=seed)), batch_size=bs, shuffle=shuffle)


def trainer(*callbacks, **kwargs) -> Trainer:
    "A CPU `Trainer` for one epoch, without logger, checkpoints, progress bar or summary unless asked"
    quiet = dict(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False)
    return Trainer(callbacks=list(callbacks), **{**quiet, **kwargs})


class AtTrainStart(Callback):
    "Records, as the first training step starts (after every `on_train_start`), the layouts of weights and Adam state"
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if hasattr(self, 'seen'): return
        opt = trainer.optimizers[0]
        self.seen = dict(
            step=trainer.global_step,
            params=[cl(p) for p in pl_module.parameters() if p.dim() == 4],
            state=[cl(v) for p in pl_module.parameters() if p.dim() == 4 for v in opt.state[p].values()
                   if torch.is_tensor(v) and v.dim() == 4])


def checksum(model) -> str:
    "sha256 over the bytes of every parameter and buffer, in a fixed order and layout"
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode()); h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class StepClock:
    "A fake clock for the trial: every training step lasts `costs[layout]` seconds of the layout it ran in"
    def __init__(self, cb, costs): self.cb, self.costs, self.t = cb, costs, 0.
    def __call__(self):
        self.t += self.costs[self.cb.layout]
        return self.t
