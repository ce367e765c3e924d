import os

import pytest
import torch

# Tests run on CPU with a fixed thread count so results are reproducible.
torch.set_num_threads(int(os.environ.get("DFKT_TEST_THREADS", "2")))
# ... or on DFKT_TEST_DEVICE (e.g. cuda: benchmarks/gpu-check.sh): runs with device 'auto' (the default)
# train there, subprocesses too (DFKT_DEVICE); tests that pin device='cpu' (gloo DDP, bit-exact checks) stay put
os.environ["DFKT_DEVICE"] = os.environ.get("DFKT_TEST_DEVICE", "cpu")   # module-scoped fixtures included


@pytest.fixture(autouse=True)
def _no_shared_data(monkeypatch):
    """Tests never depend on ../shared: they use the embedded digits and files they create."""
    monkeypatch.delenv("DFKT_DATA", raising=False)
