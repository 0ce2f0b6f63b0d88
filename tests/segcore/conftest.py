"""Fixtures shared by the segcore tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread(request):
    """Tiny training runs on one torch thread (fastest for tiny models, no stall on a busy machine,
    and the same count for runs compared bit for bit); slow tests use two. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)
