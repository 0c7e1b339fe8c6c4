"""Two DDP processes on CPU (gloo): masks differ between ranks, weights stay in sync."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO, communicate_all, free_port

WORKER = """
import json, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from lightning.pytorch.callbacks import Callback
from components.config import load_config
from components import generator

class Record(Callback):
    masks = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.masks.append(module.last_masked.int().tolist())
    def on_train_end(self, trainer, module):
        weights = {{k: v.sum().item() for k, v in module.model.state_dict().items()}}
        first = module.model.head.weight.flatten()[:8].tolist()
        Path({out!r}, f"rank{{trainer.global_rank}}.json").write_text(
            json.dumps({{"masks": self.masks, "weights": weights, "first": first, "world": trainer.world_size}}))

cfg = load_config({params!r}, "smoke").base
cfg = replace(cfg, train=replace(cfg.train, steps=3, batch_size=4, checkpoint_every=100, devices=2))
generator.train(cfg, "base", Path({tokens!r}), Path({features!r}), Path({out!r}) / "model", Path({out!r}) / "ckpt",
                callbacks=[Record()])
"""


def test_two_ranks_draw_different_masks_and_keep_identical_weights(smoke_cascade, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), params=str(REPO / "params.yaml"), tokens=str(smoke_cascade.tokens),
                                    features=str(smoke_cascade.art.features), out=str(tmp_path)))
    port = free_port()
    procs = []
    for rank in range(2):
        # what torchrun sets: Lightning sees externally launched processes and joins them with gloo
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = communicate_all(procs, timeout=300)
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["masks"]) == len(r1["masks"]) == 3
    assert all(m0 != m1 for m0, m1 in zip(r0["masks"], r1["masks"]))  # every step: the ranks' masks differ
    assert r0["weights"] == r1["weights"] and r0["first"] == r1["first"]  # all-reduced: replicas identical
    assert (tmp_path / "model" / "generator.safetensors").exists()  # rank 0 exported
