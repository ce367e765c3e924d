import os

import pytest
import torch

# Tests run on CPU with a fixed thread count so results are reproducible.
torch.set_num_threads(int(os.environ.get("DFKT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _no_shared_data(monkeypatch):
    """Tests never depend on ../shared: they use the embedded digits and files they create."""
    monkeypatch.delenv("DFKT_DATA", raising=False)
