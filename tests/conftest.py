import pytest
import torch


def pytest_collection_modifyitems(config, items):
    "Skip `cuda`-marked tests cleanly where there is no GPU."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords: item.add_marker(skip)
