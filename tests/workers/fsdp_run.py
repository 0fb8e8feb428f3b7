"""Run by torchrun (2 ranks, gloo, CPU): FSDP2 training with moe_balance, a control and a resume.

Usage: fsdp_run.py OUT MODE
MODE:
* "before": torch ``fully_shard`` per decoder layer + root on a ("dp",) mesh, bf16 params / fp32 reduce;
  a tiny Mixtral patched *before* sharding (loss attached to the router outputs);
* "after": the same, a tiny Ernie 4.5 patched *after* sharding (its selection bias is a frozen
  ``nn.Parameter``, sharded into a DTensor) with ``balancer.loss()`` added by hand;
* "accelerate": Accelerate FSDP2 (``ParallelismConfig(dp_shard_size=2)``) + ``attach`` after ``prepare``;
* "trainer": the HF Trainer with ``fsdp_config={"version": 2}`` + ``MoEBalanceCallback`` (patched in
  ``Trainer.__init__``, before the Trainer shards).
Accelerate and the Trainer fall back to DDP on CPU without a word; both are forced to FSDP2 here
(see ``force_fsdp``) and every mode asserts sharded DTensor parameters.

Each mode trains three times from the same seed: balanced for 2K steps with a checkpoint at K, resumed
from that checkpoint to 2K, and a control without balancing. Writes OUT/rank<r>.json: world size, biases,
losses, MaxVio (last training window and held-out), which parameters changed, the all-reduce group.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_balance.patching.api import find_routers
from moe_balance.testing import batches, eval_maxvio, skew_routers, stdlib_corpus, tiny_model

K = 10            # steps before the checkpoint; the runs train 2K
BATCH, SEQ = 8, 64
RATE = 1e-2       # sign rule on softmax probabilities: a few dozen steps are enough
BALANCED = dict(bias_update="sign", bias_update_rate=RATE, aux_loss="global_batch", aux_loss_coef=1e-2)
# "before" mode: the default rule with the online fold, which edits each rank's fp32 router shard after every step
FOLDED = dict(bias_update="quantile", fold_share=0.5)
CONTROL = dict(bias_update="none", aux_loss="none")


def rank_batches(train: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Each rank its own windows, the same ones in every run (the resume replays steps K..2K)."""
    stream = batches(train, BATCH, SEQ, seed=100 + rank)
    return [next(stream) for _ in range(2 * K)]


def skewed_model(model_type: str = "mixtral") -> torch.nn.Module:
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    model = tiny_model(model_type, vocab_size=256)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))
    return model


def router_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(r["name"] + "." for r in find_routers(model))


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full fp32 tensor (DTensors gathered: a collective, same order on all ranks)."""
    out = {}
    for name, param in model.named_parameters():
        data = param.detach()
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        out[name] = data.float().clone()
    return out


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {name: not torch.equal(before[name], after[name]) for name in before}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def summary(bal, model: torch.nn.Module, losses: list[float], start: dict[str, torch.Tensor],
            end: dict[str, torch.Tensor], routers: tuple[str, ...], group) -> dict:
    """What the test compares across ranks, runs and the control (MaxVio of the last training window)."""
    window = bal.metrics()
    native = [n for n in end if n.endswith("e_score_correction_bias")]
    return {"losses": losses, "bias": bal.bias_LE.tolist(), "num_steps": bal.num_steps,
            "train_maxvio": window["maxvio_global"], "tokens": window["tokens"], "calls": bal.reducer.calls,
            "group_size": dist.get_world_size(bal.reducer.group), "group_is_mesh": bal.reducer.group is group,
            "changed": changed(start, end), "routers": [n for n in start if n.startswith(routers)],
            "native": [end[n].reshape(-1).tolist() for n in native],
            "native_sharded": [is_dtensor(p) for n, p in model.named_parameters() if n in native],
            "router_values": [end[n].reshape(-1)[:64].tolist() for n in end if n.startswith(routers)],
            "fold_fit": window.get("fold_fit")}


# ----------------------------------------------------------------------------- torch FSDP2
def torch_run(mode: str, balanced: bool, steps: range, ckpt: Path | None, save_at: int | None, data, val):
    """One run of plain torch FSDP2: shard each decoder layer and the root, patch before or after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    import moe_balance as mb

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    # The balancer sums counts over the data-parallel group: the mesh's, not WORLD by default.
    group = mesh.get_group("dp")
    cfg = (FOLDED if mode == "before" else BALANCED) if balanced else CONTROL
    resume = ckpt is not None and save_at is None
    # Ernie 4.5 keeps its selection bias as a frozen nn.Parameter, which fully_shard turns into a DTensor
    # shard: patching after sharding reads it whole and every step writes each rank's slice.
    model = skewed_model("mixtral" if mode == "before" else "ernie4_5_moe")
    routers = router_prefixes(model)
    state = ckpt / "balancer.pt" if resume else None
    if mode == "before":
        bal = mb.patch(model, attach_loss=True, process_group=group, state=state, **cfg)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if mode == "after":
        bal = mb.patch(model, process_group=group, **cfg)
        if resume:
            bal.load(ckpt / "balancer.pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert all(is_dtensor(p) for p in model.parameters()), "parameters are not all sharded DTensors"
    if resume:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(ckpt / "dcp"))  # in place into the DTensor shards
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    start = full_params(model)
    losses = []
    for step in steps:
        ids = data[step]
        loss = model(input_ids=ids, labels=ids).loss
        if mode == "after":
            loss = loss + bal.loss()  # patch-after takes the loss by hand, patch-before attaches it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bal.step()
        losses.append(loss.item())
        if save_at is not None and step + 1 == save_at:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"))
            if dist.get_rank() == 0:
                bal.save(ckpt / "balancer.pt")
            dist.barrier()
    end = full_params(model)
    result = summary(bal, model, losses, start, end, routers, group)
    result["eval_maxvio"] = eval_maxvio(model, bal, val, n_batches=4)
    return result, end


def torch_mode(mode: str, out: Path, data, val) -> dict:
    ckpt = out / "ckpt"
    ckpt.mkdir(exist_ok=True)
    full, full_end = torch_run(mode, True, range(2 * K), ckpt, K, data, val)
    resumed, resumed_end = torch_run(mode, True, range(K, 2 * K), ckpt, None, data, val)
    control, _ = torch_run(mode, False, range(2 * K), None, None, data, val)
    return {"full": full, "resumed": resumed, "control": control, "resumed_params_equal": same(full_end, resumed_end)}


# ------------------------------------------------------------------------------ Accelerate
def fsdp2_plugin(**overrides):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy
    settings = dict(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                    transformer_cls_names_to_wrap=["MixtralDecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
                    mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    settings.update(overrides)
    return FullyShardedDataParallelPlugin(**settings)


def force_fsdp(accelerator, plugin, parallelism_config=None) -> bool:
    """accelerate's AcceleratorState enables FSDP only for GPU-like distributed types: on CPU it stays
    MULTI_CPU, drops the plugin (``is_fsdp2`` False) and ``prepare`` wraps the model in DDP without a word;
    a parallelism config is refused there. FSDP2 itself runs on CPU with gloo, so set the engine as
    AcceleratorState would on GPUs, then the mesh as ``Accelerator.__init__`` does. Every later
    ``AcceleratorState()`` copies the distributed type from PartialState's shared state (``save_state``
    would silently save as DDP), so it is set there too. Returns whether it had to."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return False
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if parallelism_config is not None:
        state.parallelism_config = parallelism_config
        state.device_mesh = parallelism_config.get_device_mesh(accelerator.device.type)
        parallelism_config._validate_accelerator(accelerator)
    return True


def accelerate_run(balanced: bool, steps: range, ckpt: Path | None, save_at: int | None, data, val):
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    from moe_balance.integrations.accelerate import attach

    AcceleratorState._reset_state(True)  # one Accelerator per run in this process
    plugin = fsdp2_plugin()
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    forced = force_fsdp(accelerator, plugin, ParallelismConfig(dp_shard_size=2))
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    assert accelerator.num_processes == 2
    model = skewed_model()
    routers = router_prefixes(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert all(is_dtensor(p) for p in model.parameters()), "accelerate did not shard every parameter"
    bal = attach(accelerator, model, optimizer, **(BALANCED if balanced else CONTROL))
    if ckpt is not None and save_at is None:
        accelerator.load_state(str(ckpt / "state"))
    start = full_params(model)
    losses = []
    for step in steps:
        ids = data[step]
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()  # attach() steps the balancer here
        optimizer.zero_grad()
        losses.append(loss.item())
        if save_at is not None and step + 1 == save_at:
            accelerator.save_state(str(ckpt / "state"))
    assert accelerator.distributed_type == DistributedType.FSDP, "the engine changed during the run"
    end = full_params(model)
    result = summary(bal, model, losses, start, end, routers, accelerator.torch_device_mesh["dp_cp"].get_group())
    result["forced_fsdp"] = forced
    result["eval_maxvio"] = eval_maxvio(model, bal, val, n_batches=4)
    return result, end


def accelerate_mode(out: Path, data, val) -> dict:
    ckpt = out / "ckpt"
    ckpt.mkdir(exist_ok=True)
    full, full_end = accelerate_run(True, range(2 * K), ckpt, K, data, val)
    resumed, resumed_end = accelerate_run(True, range(K, 2 * K), ckpt, None, data, val)
    # no control: the same skewed Mixtral and data as the "before" mode, whose control shows the collapse
    return {"full": full, "resumed": resumed, "resumed_params_equal": same(full_end, resumed_end)}


# ---------------------------------------------------------------------------------- Trainer
def fsdp_trainer_class():
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CPUFSDPTrainer(Trainer):
        """The Trainer builds its Accelerator inside ``__init__``; on CPU accelerate drops the FSDP plugin and
        ``is_fsdp_enabled`` stays False (the run would be plain DDP). Force FSDP2 right after, before
        anything (callbacks included) looks at it."""

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            self.forced_fsdp = False
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.forced_fsdp = force_fsdp(self.accelerator, plugin, ParallelismConfig(dp_shard_size=2))
                self.is_fsdp_enabled = True

    return CPUFSDPTrainer


def trainer_run(folder: Path, out: Path, balanced: bool, resume: str | None, val) -> tuple[dict, dict]:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    from moe_balance.integrations.hf import MoEBalanceCallback, checkpoint_keys, repair_converted_weights
    from tests.hf_helpers import args, datasets, load

    AcceleratorState._reset_state(True)  # one Accelerator per Trainer in this process
    cb = MoEBalanceCallback(write_stats=False, **(BALANCED if balanced else CONTROL))
    train_ds, _ = datasets(n_train=16 * 2 * K)
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["MixtralDecoderLayer"],
                   "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}
    settings = dict(max_steps=2 * K, per_device_train_batch_size=BATCH, logging_steps=1, ddp_backend="gloo",
                    fsdp="full_shard auto_wrap", fsdp_config=fsdp_config, save_strategy="steps" if balanced else "no",
                    save_steps=K)
    model = load(folder)
    routers = router_prefixes(model)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainer = fsdp_trainer_class()(model=model, args=args(out, **settings), train_dataset=train_ds, callbacks=[cb])
    assert trainer.args.world_size == 2, trainer.args.world_size
    assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.accelerator.distributed_type == DistributedType.FSDP, "the engine changed during the run"
    assert isinstance(trainer.model, FSDPModule), type(trainer.model)
    assert all(isinstance(layer, FSDPModule) for layer in trainer.model.model.layers)
    assert all(is_dtensor(p) for p in trainer.model.parameters()), "the Trainer did not shard every parameter"
    bal = cb.balancer
    end = full_params(trainer.model)
    # steps 1..K of a resumed run come from the checkpoint's trainer_state.json, the rest were trained here
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    result = summary(bal, trainer.model, [logged[s] for s in sorted(logged)], start, end, routers,
                     trainer.accelerator.torch_device_mesh["dp_cp"].get_group())
    result["forced_fsdp"] = trainer.forced_fsdp
    if resume is not None:
        # The checkpoint's model.safetensors has per-expert keys the fused model lacks: the callback's
        # repair would reload them into the shards; it must leave DTensor parameters to FSDP's own load.
        keys = checkpoint_keys(resume)
        result["repair_needed_by_keys"] = keys is not None and not set(trainer.model.state_dict()) <= keys
        result["repair_done"] = repair_converted_weights(trainer.model, resume)
    result["eval_maxvio"] = eval_maxvio(trainer.model, bal, val, n_batches=4)
    return result, end


def trainer_mode(out: Path, val) -> dict:
    from tests.hf_helpers import saved_checkpoint
    folder = out / "model"
    if dist.get_rank() == 0:
        saved_checkpoint("mixtral", folder)
    dist.barrier()
    full, full_end = trainer_run(folder, out / "full", True, None, val)
    resumed, resumed_end = trainer_run(folder, out / "full", True, str(out / "full" / f"checkpoint-{K}"), val)
    return {"full": full, "resumed": resumed, "resumed_params_equal": same(full_end, resumed_end)}  # see above


def main(argv: list[str]) -> None:
    out, mode = Path(argv[0]), argv[1]
    torch.manual_seed(0)
    if not dist.is_initialized():  # one group for every scenario of a launch: a second init after a
        dist.init_process_group("gloo")  # destroy_process_group can hang in the rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    data = rank_batches(train, rank)
    started = time.perf_counter()
    if mode in ("before", "after"):
        result = torch_mode(mode, out, data, val)
    elif mode == "accelerate":
        result = accelerate_mode(out, data, val)
    elif mode == "trainer":
        result = trainer_mode(out, val)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result.update(world=world, rank=rank, seconds=time.perf_counter() - started)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.workers import run_then_exit
    run_then_exit(main)
