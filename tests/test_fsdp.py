"""FSDP2 end to end on two gloo ranks (CPU): torch ``fully_shard`` with patching before and after
sharding, Accelerate FSDP2 and the HF Trainer FSDP2 (both forced past their silent DDP fallback on CPU).

Each mode (see ``workers/fsdp_run.py``) trains a skewed tiny MoE balanced with a checkpoint halfway,
resumes from it, and (the two torch modes) trains a control without balancing. Checked here: the world size,
identical biases on both ranks, the all-reduce over the mesh's data-parallel group (tokens of both ranks in each
window, one all-reduce per optimizer step), balance against the control, every non-router parameter trained
(an earlier patch-time forward through the FSDP root left its parameters unsharded and untrained), and
an exact resume (losses, biases and every parameter).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_scenarios, scenario_result

pytest.importorskip("torch.distributed.fsdp")
SCRIPT = Path(__file__).parent / "workers" / "fsdp_run.py"
K = 10  # steps before the checkpoint (fsdp_run.K); every run trains 2K
TOKENS = 2 * 8 * 64  # both ranks' micro-batch of 8 x 64 in each step window


# Modes that share one torchrun. Accelerate's and the Trainer's each need their own: after another mode has
# destroyed its process group, Accelerate's FSDP2 mesh hangs in its first collective.
LAUNCHES = (("before", "after"), ("accelerate",), ("trainer",))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """``fsdp_runs(mode)``: the folder of that mode's results, its launch run on first use."""
    root, done = tmp_path_factory.mktemp("fsdp"), set()

    def folder(mode: str) -> Path:
        modes = next(group for group in LAUNCHES if mode in group)
        if modes not in done:
            done.add(modes)
            run_scenarios(SCRIPT, root, {m: [m] for m in modes}, nproc=2, timeout=900)
        return root / mode
    return folder


def run(mode: str, fsdp_runs) -> list[dict]:
    ranks = scenario_result(fsdp_runs(mode), 2)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        control = r.get("control", {"eval_maxvio": float("nan"), "train_maxvio": float("nan")})
        print(f"{mode} rank {r['rank']}: {r['seconds']:.1f}s, MaxVio held-out balanced "
              f"{r['full']['eval_maxvio']:.3f} vs control {control['eval_maxvio']:.3f}, last window "
              f"{r['full']['train_maxvio']:.3f} vs {control['train_maxvio']:.3f}")
    return ranks


def check(ranks: list[dict], losses_from_checkpoint: bool = False) -> None:
    r0, r1 = ranks
    for name in [n for n in ("full", "resumed", "control") if n in r0]:
        # one bias on every rank: the step's all-reduce summed both ranks' counts over the mesh's group
        assert r0[name]["bias"] == r1[name]["bias"], name
        for r in ranks:
            result = r[name]
            assert result["group_is_mesh"] and result["group_size"] == 2, name
            assert result["tokens"] == TOKENS, name
            assert result["num_steps"] == 2 * K, name
            stale = [n for n, moved in result["changed"].items() if not moved and n not in result["routers"]]
            assert not stale, f"{name}: parameters that never trained: {stale}"
            assert result["routers"], name
    for r in ranks:
        full, resumed = r["full"], r["resumed"]
        # the Accelerate and Trainer modes train the "before" mode's skewed Mixtral on the same data: its control
        # (held-out and last-window MaxVio > 2.5) stands for theirs
        control = r.get("control", {"bias": [], "eval_maxvio": 2.5, "train_maxvio": 2.5})
        assert full["calls"] == 2 * K and resumed["calls"] == K  # no extra all-reduce (e.g. on resume)
        # balance against the same run without balancing: the skewed routers stay collapsed there
        assert all(b == 0 for row in control["bias"] for b in row)
        # the bias (or, with the online fold, what it moved into the routers) is large after a collapse
        assert max(abs(b) for row in full["bias"] for b in row) >= 0.1 or (full.get("fold_fit") or 0) > 0.05
        assert control["eval_maxvio"] >= 2.5 and control["train_maxvio"] >= 2.5
        assert full["eval_maxvio"] < control["eval_maxvio"] - 0.5, (full["eval_maxvio"], control["eval_maxvio"])
        assert full["train_maxvio"] < control["train_maxvio"] - 0.5, (full["train_maxvio"], control["train_maxvio"])
        # every router weight trained too in the balanced run
        assert all(full["changed"][n] for n in full["routers"] if n.endswith(".weight"))
        # exact resume: the same losses for steps K+1..2K, the same bias, the same parameters
        resumed_losses = resumed["losses"][K:] if losses_from_checkpoint else resumed["losses"]
        assert len(resumed_losses) == K and resumed_losses == full["losses"][K:]
        assert resumed["bias"] == full["bias"] and resumed["eval_maxvio"] == full["eval_maxvio"]
        assert r["resumed_params_equal"]


@pytest.mark.slow
def test_torch_fsdp2_patched_before_fully_shard(fsdp_runs):
    """Mixtral patched first, then fully_shard per decoder layer + root (bf16 params, fp32 reduce)."""
    ranks = run("before", fsdp_runs)
    check(ranks)
    assert ranks[0]["full"]["native"] == []  # Mixtral: the balancer's own bias, no native buffer
    # the default rule with the online fold: every rank edits its own fp32 shard of each router with the same
    # all-reduced update, so the gathered routers are bitwise equal on both ranks
    for name in ("full", "resumed"):
        assert ranks[0][name]["fold_fit"] > 0.05
        assert ranks[0][name]["router_values"] == ranks[1][name]["router_values"], name


@pytest.mark.slow
def test_torch_fsdp2_patched_after_fully_shard_with_a_sharded_native_bias(fsdp_runs):
    """Ernie 4.5 sharded first, then patched: its selection bias is a frozen nn.Parameter that FSDP2
    turns into a DTensor; it is read whole at patch time and written shard by shard at each step."""
    ranks = run("after", fsdp_runs)
    check(ranks)
    for r in ranks:
        for name in ("full", "resumed", "control"):
            result = r[name]
            assert result["native_sharded"] == [True, True], name
            assert result["native"] == [row for row in result["bias"]], name  # the trained master, exactly
        assert r["full"]["changed"]["model.layers.0.mlp.gate.moe_statics.e_score_correction_bias"]


@pytest.mark.slow
def test_accelerate_fsdp2(fsdp_runs):
    """Accelerate FSDP2 on a ParallelismConfig mesh, attach() after prepare(); save_state/load_state go
    through torch.distributed.checkpoint (sharded), whose optimizer-state init step must not step the
    balancer (it used to: one spurious all-reduce and bias update on every load_state)."""
    ranks = run("accelerate", fsdp_runs)
    check(ranks)
    assert all(r[name]["forced_fsdp"] for r in ranks for name in ("full", "resumed"))


@pytest.mark.slow
def test_hf_trainer_fsdp2(fsdp_runs):
    """The Trainer with fsdp_config version 2 (FULL_STATE_DICT checkpoints) and MoEBalanceCallback; the
    resume restores weights through FSDP's own loader and the balancer from trainer_state.json."""
    ranks = run("trainer", fsdp_runs)
    check(ranks, losses_from_checkpoint=True)
    for r in ranks:
        resumed = r["resumed"]
        assert all(r[name]["forced_fsdp"] for name in ("full", "resumed"))
        # The checkpoint's model.safetensors holds per-expert keys the fused model lacks, which is when the
        # callback repairs a plain resume; over DTensor parameters it must leave FSDP's restore alone.
        assert resumed["repair_needed_by_keys"] and resumed["repair_done"] is False
