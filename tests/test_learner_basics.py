import torch
import torch.nn.functional as F

from channelslast_cb.learner import DataLoaders, Learner, accuracy
from helpers import synth_images, tiny_cnn


def test_fit_lowers_loss_and_records_floats():
    dls = DataLoaders.from_tensors(synth_images(128), valid=synth_images(64, seed=1), bs=16)
    learn = Learner(dls, tiny_cnn(), loss_func=F.cross_entropy, metrics=accuracy, lr=1e-2, progress=False)
    learn.fit(3)
    rows = learn.recorder.values
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert all(type(l) is float for l in learn.recorder.losses)
    assert len(learn.recorder.losses) == 3 * 8
