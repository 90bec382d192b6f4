import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
