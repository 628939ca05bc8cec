"""ember.optim under DDP and FSDP2 (DTensor parameters, local-shard updates): 2 gloo CPU processes
train to the same parameters as one process on the same global batches; with bf16 FSDP2 parameters
and master_weights=True, the fp32 masters are DTensor shards too (see optim_dist_worker.py)."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(__file__), "optim_dist_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("mode,names", [("ddp", "AdamW,SGD"), ("fsdp2", "AdamW,Lion,RMSprop"),
                                        ("fsdp2-master", "AdamW,SGD")])
def test_distributed_matches_single_process(mode, names):
    backend = "cpu"
    from ember import _backend
    import torch

    if _backend.why_unavailable("cpu", torch.device("cpu")):
        backend = "reference"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, WORKER, mode, names, backend], capture_output=True, text=True, timeout=240,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("max relative error") == len(names.split(",")), r.stdout
