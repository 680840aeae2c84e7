import pytest
import torch


def pytest_collection_modifyitems(config, items):
    "Skip `cuda`-marked tests cleanly where there is no GPU."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords: item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_decision_cache(tmp_path_factory, monkeypatch):
    "Each test decides in an empty decision cache of its own (never the user's), and its subprocesses share it"
    import channelslast_cb.decide as decide
    monkeypatch.setenv(decide.CACHE_ENV, str(tmp_path_factory.mktemp('decisions')))
    monkeypatch.setattr(decide, '_warned', set())
