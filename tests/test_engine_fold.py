"""The online fold through engines that keep their own copy of the weights (two gloo ranks, CPU).

DeepSpeed ZeRO-2 and ZeRO-3 in bf16 keep fp32 master weights and write them into the bf16 model after every
step: a fold into the bf16 router alone would be lost at the next step. Checked: the world size and the
engine's stage, bitwise-equal router weights on both ranks after every step (master and bf16 copy), the bf16
copy equal to the rounded master, the routers moved by the fold, one all-reduce per step, and the saved
model, loaded by stock transformers in a fresh process without moe_balance, with the trained model's loss and
balance. (FSDP2: tests/test_fsdp.py; the HF Trainer, Lightning and a plain loop: tests/test_export.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import run_scenarios, scenario_result
from .test_export import _stock_eval

SCRIPT = Path(__file__).parent / "workers" / "ds_fold_run.py"


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Path:
    """ZeRO-2, then ZeRO-3, in one torchrun of two ranks."""
    root = tmp_path_factory.mktemp("ds_fold")
    run_scenarios(SCRIPT, root, {f"zero{stage}": [str(stage)] for stage in (2, 3)}, nproc=2, timeout=900)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_fold_edits_master_and_model_copies(stage, stages):
    tmp_path = stages / f"zero{stage}"
    ranks = scenario_result(tmp_path, 2)
    for r in ranks:
        assert r["world"] == 2 and r["stage"] == stage and r["num_steps"] == 12
        assert r["calls"] == 12  # one all-reduce per step: the fold's sums ride it
        assert r["fold_fit"] > 0.05 and max(r["moved"]) > 1e-3
        # bf16 keeps 8 bits: the model copy is the master rounded (twice at most, the step's and the fold's);
        # a fold missing from either copy would show as a gap of the fold's size (>= 1e-3 of the weights here)
        assert r["low_master_gap"] < 2 ** -7, r["low_master_gap"]
        assert r["bias_after_ship"] == 0.0
        # ZeRO-3 is not run by ship (a forward outside the engine would leave its parameters gathered)
        assert 0.5 < r["shipped_agreement"] <= 1.0 if stage == 2 else r["shipped_agreement"] != r["shipped_agreement"]
    assert ranks[0]["masters"] == ranks[1]["masters"] and ranks[0]["lows"] == ranks[1]["lows"]
    assert ranks[0]["final_master"] == ranks[1]["final_master"]
    held = torch.load(tmp_path / "held.pt", weights_only=True)
    stock = _stock_eval(tmp_path / "saved", held, tmp_path)
    trained = ranks[0]
    # the saved model is the trained one in bf16 weights: the same routing up to bf16 rounding of the logits
    assert abs(stock["loss"] - trained["trained_loss"]) < 0.02
    assert abs(stock["maxvio"] - trained["trained_maxvio"]) < 0.1 + 0.1 * trained["trained_maxvio"]
