"""Two real processes under torchrun with a real Trainer (gloo, CPU); DeepSpeed config through the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, fail_if_scenario_raised, free_port, run_scenarios, run_single_process

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "workers" / "hf_two_ranks.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun of two ranks: "still" (lr 0, the bias alone moves), then "training" (lr 1e-3). Each
    scenario's folder holds its checkpoint; the ranks write into <folder>/ddp."""
    root = tmp_path_factory.mktemp("hf_two_ranks")
    run_scenarios(SCRIPT, root, {name: [str(root / name / "ddp"), lr, "4"]
                                 for name, lr in (("still", "0.0"), ("training", "1e-3"))}, nproc=2, timeout=900)
    return root


def ddp_ranks(folder: Path) -> list[dict]:
    fail_if_scenario_raised(folder)  # the ranks wrote .pt files, not scenario_result's JSON
    return [torch.load(folder / "ddp" / f"rank{r}.pt") for r in range(2)]


def test_two_rank_trainer_biases_match_each_other_and_one_process(two_ranks, tmp_path):
    ckpt = two_ranks / "still"
    ranks = ddp_ranks(ckpt)
    assert [r["world"] for r in ranks] == [2, 2]
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    assert ranks[0]["calls"] == ranks[0]["steps"] == 5  # one all-reduce per optimizer step
    # the all-reduced expectation: one process routing the same global batches (8 sequences a step)
    from .workers.hf_two_ranks import main
    run_single_process(main, str(ckpt), str(tmp_path / "single"), 0.0, 8)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert single["world"] == 1 and single["calls"] == 0
    assert torch.equal(ranks[0]["bias"], single["bias"])
    assert ranks[0]["bias"].abs().max() > 0


def test_two_rank_training_keeps_ranks_identical(two_ranks):
    ranks = ddp_ranks(two_ranks / "training")
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"]) and ranks[0]["world"] == 2
    assert ranks[0]["steps"] == 5 and ranks[0]["calls"] == 5  # the second run's own balancer, not the first's


DS_SCRIPT = r'''
import os, sys, json
import deepspeed
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from transformers import Trainer
from moe_balance.integrations.hf import MoEBalanceCallback
from tests.hf_helpers import args, datasets, load, saved_checkpoint
from pathlib import Path
out = Path(sys.argv[1])
ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
             "zero_optimization": {"stage": 0},
             "moe_balance": {"bias_update": "normalized", "bias_update_rate": 0.002, "z_loss_coef": 0.001}}
cb = MoEBalanceCallback()
train_ds, _ = datasets(n_train=64)
trainer = Trainer(model=load(saved_checkpoint("mixtral", out / "ckpt")),
                  args=args(out / "run", max_steps=3, per_device_train_batch_size=4, deepspeed=ds_config),
                  train_dataset=train_ds, callbacks=[cb])
trainer.train()
print(json.dumps({"engine": type(trainer.model_wrapped).__name__, "bias_update": cb.config.bias_update,
                  "rate": cb.config.bias_update_rate, "z": cb.config.z_loss_coef, "steps": cb.balancer.num_steps,
                  "bias_max": float(cb.balancer.bias_LE.abs().max())}))
'''


def test_trainer_with_deepspeed_config_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["engine"] == "DeepSpeedEngine"
    assert (result["bias_update"], result["rate"], result["z"]) == ("normalized", 0.002, 0.001)
    assert result["steps"] == 3 and result["bias_max"] > 0
