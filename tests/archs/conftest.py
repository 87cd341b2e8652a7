import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Fresh random inputs per test, reproducible from the test's id; one intra-op thread (tiny
    tensors: more threads only spin, and slow to a crawl when the cores are shared)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
