"""Run under torchrun: a real DeepSpeed engine from moe_balance.integrations.deepspeed.initialize.

Usage: ds_run.py OUT MODEL STAGE GA STEPS [--k K] [--ep EP] [--save N] [--load DIR] [--lr LR]
MODEL is "hf" (tiny skewed Mixtral) or "dsmoe" (a small LM of deepspeed.moe.layer.MoE layers).
Writes OUT/rank<r>.json with losses, biases, step counts and balance before/after.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # keep op JIT builds out of tests

from moe_balance.integrations import deepspeed as mb_ds  # noqa: E402
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model  # noqa: E402


class Expert(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MoELM(torch.nn.Module):
    """Embedding, two DeepSpeed MoE layers with residuals, LM head; loss includes DeepSpeed's l_aux."""

    def __init__(self, k=1, ep=1, hidden=32, experts=8, vocab=256):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.moes = torch.nn.ModuleList([
            MoE(hidden_size=hidden, expert=Expert(hidden), num_experts=experts, ep_size=ep, k=k,
                capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, top2_2nd_expert_sampling=False)
            for _ in range(2)])
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        aux = 0.0
        for moe in self.moes:
            out, l_aux, _ = moe(h)
            h = h + out
            aux = aux + l_aux
        logits = self.head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        return loss + 1e-3 * aux


def main(argv: list[str]):
    p = argparse.ArgumentParser()
    p.add_argument("out"); p.add_argument("model"); p.add_argument("stage", type=int)
    p.add_argument("ga", type=int); p.add_argument("steps", type=int)
    p.add_argument("--k", type=int, default=1); p.add_argument("--ep", type=int, default=1)
    p.add_argument("--save", type=int, default=0); p.add_argument("--load", default="")
    p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--rate", type=float, default=2e-3)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--rule", default="sign", help="bias_update of the moe_balance entry")
    p.add_argument("--space", default="auto", help="bias_space of the moe_balance entry")
    p.add_argument("--step", default="", help="quantile_step of the moe_balance entry (default: the config's)")
    p.add_argument("--no-entry", action="store_true")
    p.add_argument("--fp16", action="store_true", help="DeepSpeed fp16 with a static loss scale of 1024")
    a = p.parse_args(argv)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    sample = next(batches(train, 8, 64, seed=9))
    if a.model == "hf":
        model = tiny_model("mixtral", vocab_size=256)
    else:
        model = MoELM(k=a.k, ep=a.ep)
    skew_routers(model, sample, strength=3.0)
    config = {"train_micro_batch_size_per_gpu": a.bs, "gradient_accumulation_steps": a.ga,
              "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "torch_adam": True}},
              "zero_optimization": {"stage": a.stage}, "steps_per_print": 10**9,
              "moe_balance": {"bias_update": a.rule, "bias_update_rate": a.rate, "bias_space": a.space,
                              **({"quantile_step": a.step} if a.step else {})}}
    fp16_forced = False
    if a.fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 1024}
        from deepspeed.accelerator import get_accelerator
        if not get_accelerator().is_fp16_supported():
            # DeepSpeed's CPU accelerator refuses fp16 where mkldnn lacks it (AMD EPYC without AVX512-FP16),
            # though torch computes fp16 on any CPU: lift the refusal so the real FP16 optimizer and its
            # loss_scale still run here (slower kernels, same code path for moe_balance).
            get_accelerator().is_fp16_supported = lambda: True
            fp16_forced = True
    if a.no_entry:
        del config["moe_balance"]
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _, _, _ = mb_ds.initialize(model=model, model_parameters=model.parameters(), config=config)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "no_entry.json").write_text(json.dumps({
            "warned": any("no \"moe_balance\" entry" in str(w.message) for w in caught),
            "engine": type(engine).__name__, "patched": any(type(m).__name__.startswith("Balanced")
                                                            for m in model.modules())}))
        return
    engine, _, _, _ = mb_ds.initialize(model=model, model_parameters=model.parameters(), config=config)
    bal = mb_ds.balancer(engine)
    if a.load:
        engine.load_checkpoint(a.load)
    val, _ = stdlib_corpus(max_bytes=200_000, split="val")

    def measure():
        engine.eval()
        with bal.measuring(), torch.no_grad():
            held = batches(val, 16, 64, seed=5)
            for _ in range(4):
                ids = next(held)
                engine(input_ids=ids)
        engine.train()
        return bal.metrics()

    before = measure()
    data = ByteWindows(train, 64, 100_000)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist()
    cursor = bal.num_steps * a.ga * world * a.bs  # continue the same data stream after a load
    losses, steps_seen = [], []
    for micro in range(a.steps * a.ga):
        start = cursor + (micro * world + rank) * a.bs
        ids = torch.stack([data[i]["input_ids"] for i in order[start:start + a.bs]])
        out = engine(input_ids=ids, labels=ids)
        loss = out.loss if hasattr(out, "loss") else out
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        steps_seen.append(bal.num_steps)
        if a.save and bal.num_steps == a.save and steps_seen.count(a.save) == 1:
            engine.save_checkpoint(str(Path(a.out) / "ckpt"), tag="t")
    after = measure()
    from moe_balance.patching.api import patch_state_of
    result = {"rank": rank, "world": world, "losses": losses, "steps_seen": steps_seen, "num_steps": bal.num_steps,
              "calls": bal.reducer.calls, "bias": bal.bias_LE.tolist(), "before": before, "after": after,
              "layers": bal.num_layers, "backward_scale": float(patch_state_of(model).backward_scale()),
              "optimizer": type(engine.optimizer).__name__, "fp16_forced": fp16_forced,
              "group_is_engine_dp": bal.reducer.group is not None
              and bal.reducer.group is mb_ds.data_parallel_group(engine)}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(main)
