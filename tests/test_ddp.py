"""LoRA and LoReFT under torch.distributed DDP on the CPU: torchrun, gloo, 2 ranks
(tests/ddp_worker.py does the training)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_two_ranks_stay_in_sync(method):
    pytest.importorskip("transformers")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        WORKER,
        method,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IN_SYNC" in done.stdout and "TRAINED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
