"""Add a small update to a parameter wherever the engine keeps it, with no collective.

The online fold (:mod:`.fold`) edits router weights after every optimizer step. An edit of the model's
tensor alone is lost where the optimizer keeps its own fp32 master copy and writes it back after the next
step (DeepSpeed ZeRO-1/2/3 and its bf16 optimizer), and a sharded parameter (FSDP2, ZeRO-3) holds only this
rank's piece. Every rank computes the same full update (it comes from all-reduced statistics), so each
rank adds the slice it owns and nothing is gathered:

* plain tensors (DDP, the HF Trainer, Accelerate, Lightning, AMP with fp32 weights): in place;
* FSDP2 ``DTensor`` parameters (fp32 shards; mixed precision casts at all-gather): the local shard;
* DeepSpeed ZeRO-1/2 and the bf16 optimizer: the full low-precision parameter and this rank's fp32 master
  fragment (``param._hp_mapping``: the fragment ``safe_set_full_fp32_param`` writes; reading the master
  through ``safe_get_full_fp32_param`` would all-reduce the whole weight);
* DeepSpeed ZeRO-3: the low-precision partition ``param.ds_tensor`` and the fp32 partition through the
  public ``safe_get_local_fp32_param`` / ``safe_set_local_fp32_param``.

A plain bf16/fp16 tensor with no master copy (a model loaded in bf16 and trained as is) rounds the edit: at
hidden 4096 a logit shift of 0.01 keeps about 13% of itself in bf16 weights of scale 0.02, and 0.001 about 1%.
:func:`add_to_param` then returns what the tensor actually took, so the caller keeps the rest (see
:class:`moe_balance.patching.folding.FoldIntoRouters`).
"""

from __future__ import annotations

import torch

from .patching.strategies import _is_dtensor


def engine_of(param: torch.Tensor) -> str:
    """Which copy-keeping scheme holds ``param``: ``zero3``, ``zero12``, ``dtensor`` or ``plain``."""
    if hasattr(param, "ds_id"):
        return "zero3"
    # ZeRO-1/2 (and the bf16 optimizer) give every parameter the attribute, None on ranks that hold no fragment
    # of its fp32 master: those edit the model copy only, the owner rank its master
    if hasattr(param, "_hp_mapping"):
        return "zero12"
    if _is_dtensor(param):
        return "dtensor"
    return "plain"


LOW_PRECISION = (torch.bfloat16, torch.float16)


@torch.no_grad()
def add_to_param(param: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """``param += delta`` for the full-shape ``delta`` (fp32 or fp64), in every copy the engine keeps.

    Returns the change a plain low-precision tensor (the only copy there is) actually took, in fp32 and full
    shape, or None where the edit lands whole: an fp32/fp64 tensor, or an engine that keeps an fp32 master
    (ZeRO, FSDP2 with fp32 shards), which the next optimizer step writes back. Every rank holds the same plain
    tensor and rounds the same way, so what it returns is the same on every rank.
    """
    kind = engine_of(param)
    if kind == "plain":
        if param.dtype not in LOW_PRECISION:
            param.data.add_(delta.to(param.device, param.dtype))
            return None
        before = param.detach().float()
        param.data.add_(delta.to(param.device, torch.float32).to(param.dtype))
        return param.detach().float() - before
    elif kind == "dtensor":
        from torch.distributed.tensor import distribute_tensor
        local = distribute_tensor(delta.to(param.device, torch.float32), param.device_mesh, param.placements,
                                  src_data_rank=None)  # this rank's slice of an update every rank computed
        param.data.add_(local.to(param.dtype))
    elif kind == "zero12":
        _add_zero12(param, delta)
    else:
        _add_zero3(param, delta)
    return None


def _add_zero12(param: torch.Tensor, delta: torch.Tensor) -> None:
    flat = delta.reshape(-1).to(param.device, torch.float32)
    param.data.add_(flat.reshape(param.shape).to(param.dtype))
    if param._hp_mapping is None:  # another rank holds all of this parameter's master
        return
    address = param._hp_mapping.lp_fragment_address
    hp_fragment = param._hp_mapping.get_hp_fragment()
    hp_fragment.data.add_(flat.narrow(0, address.start, address.numel).to(hp_fragment.device, hp_fragment.dtype))


def _add_zero3(param: torch.Tensor, delta: torch.Tensor) -> None:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
    lp_part = param.ds_tensor  # this rank's low-precision partition, flat, padded at the end
    per_rank = lp_part.numel()
    rank = dist.get_rank(group=param.ds_process_group)
    flat = delta.reshape(-1).to(lp_part.device, torch.float32)
    padded = torch.zeros(per_rank * dist.get_world_size(group=param.ds_process_group), dtype=torch.float32,
                         device=flat.device)
    padded[:flat.numel()] = flat
    piece = padded.narrow(0, per_rank * rank, per_rank)
    lp_part.data.add_(piece.to(lp_part.dtype))
    hp = safe_get_local_fp32_param(param) if param.requires_grad else None
    if hp is not None:  # frozen parameters have no master copy
        safe_set_local_fp32_param(param, hp + piece.reshape(hp.shape).to(hp.device, hp.dtype))


__all__ = ["add_to_param", "engine_of"]
