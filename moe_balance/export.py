"""Ship what was trained: make a patched model route, without moe-balance, as it did in training.

Stock transformers, vLLM, SGLang and llama.cpp read only a checkpoint's weights and config. A selection
bias survives there only where the architecture has a buffer for it (DeepSeek-V3's
``e_score_correction_bias``, written back by the patch). For every other router the bias lives beside
the checkpoint and is lost when the model is served. Two steps close that gap:

* during training, ``BalanceConfig.bias_absorb_coef`` teaches the router weights the bias (the
  controller's bias then shrinks toward what the weights cannot carry);
* at the end, :func:`fold_bias` folds what is left into the router weights: into the router's own
  linear bias where it has one (gpt-oss: exact), else by least squares of the constant bias on the
  router inputs, ``dW = b (S^-1 mu)^T`` with ``mu``/``S`` the first and second moments of the inputs over a
  calibration sample (a constant is well explained by post-norm hidden states). The bias is then zeroed,
  so the patched model and the stock one route the same.

:func:`save_pretrained` writes the folder plus ``moe_balance_fold.safetensors`` (what was folded, so the
trained model can be rebuilt), and :func:`check_export` compares a saved folder loaded by stock
transformers with the trained model: per-layer top-k agreement, loss and MaxVio both ways.
``moe_balance.unpatch`` is unchanged: folding is a separate, named step.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import stats
from .balancer import load_state_file
from .patching.api import patch_state_of
from .patching.strategies import RouterSite, is_sharded

FOLD_FILE = "moe_balance_fold.safetensors"
STATE_FILE = "moe_balance.pt"  # what the integrations save beside a checkpoint


@dataclass
class LayerFold:
    """What :func:`fold_bias` did to one router."""

    router: str
    param: str
    """Name of the tensor that took the fold (the router's linear bias or its weight)."""
    bias_E: torch.Tensor
    """The selection bias that was folded (and then zeroed in the balancer)."""
    direction_D: torch.Tensor | None
    """``S^-1 mu``: the weight moved by ``bias_E ⊗ direction_D``; None when folded into a linear bias."""
    fit_r2: float
    """How much of a constant the router inputs explain (1 = exact; the linear-bias fold is exact)."""


@dataclass
class FoldReport:
    layers: dict[int, LayerFold] = field(default_factory=dict)
    tokens: int = 0
    agreement_L: list[float] | None = None
    """Per layer: share of tokens whose chosen experts after the fold (no bias) equal those before (with it)."""

    @property
    def min_agreement(self) -> float | None:
        return min(self.agreement_L) if self.agreement_L else None


def _as_inputs(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        keep = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
        return {k: v for k, v in batch.items() if k in keep and v is not None}
    raise TypeError(f"moe_balance.export: a batch must be a tensor of input ids or a mapping, got {type(batch)}")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


class _Recorder:
    """Per layer: chosen experts (with the mask) and, for folding, moments of the router's linear input."""

    def __init__(self, moments: bool) -> None:
        self.moments = moments
        self.selections: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.linear: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.sums: dict[int, list[torch.Tensor]] = {}  # n, sum h, sum h h^T (fp64)

    def __call__(self, site: RouterSite, indices: torch.Tensor, linear_call: tuple | None) -> None:
        T = indices.reshape(-1, indices.shape[-1]).shape[0]
        mask = site.state.batch.mask_for(T)
        self.selections.setdefault(site.layer, []).append(
            (indices.reshape(T, -1).detach().cpu(), None if mask is None else mask.reshape(T).bool().cpu()))
        if not self.moments or linear_call is None:
            return
        x, weight, bias = linear_call
        self.linear[site.layer] = (weight, bias)
        h_TD = x.detach().reshape(-1, x.shape[-1]).double()
        if mask is not None and h_TD.shape[0] == T:
            h_TD = h_TD[mask.reshape(T).bool().to(h_TD.device)]
        sums = self.sums.setdefault(site.layer, [h_TD.new_zeros(()), h_TD.new_zeros(h_TD.shape[-1]),
                                                 h_TD.new_zeros(h_TD.shape[-1], h_TD.shape[-1])])
        sums[0] += h_TD.shape[0]
        sums[1] += h_TD.sum(0)
        sums[2] += h_TD.T @ h_TD


@torch.no_grad()
def _run(model: torch.nn.Module, batches: Iterable[Any], recorder: _Recorder) -> list[float]:
    """Forward every batch (no grad: nothing is counted by the balancer) with the recorder attached."""
    state = patch_state_of(model)
    device, losses = _model_device(model), []
    state.capture = recorder
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in _as_inputs(batch).items()}
            if "input_ids" in inputs:
                labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100) \
                    if "attention_mask" in inputs else inputs["input_ids"]
                out = model(**inputs, labels=labels)
                losses.append(float(out.loss))
            else:
                model(**inputs)
    finally:
        state.capture = None
        model.train(was_training)
    return losses


def _selections(recorder: _Recorder) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: ``[N, K]`` sorted chosen experts and ``[N]`` real-token mask over every recorded token."""
    out = {}
    for layer, parts in recorder.selections.items():
        idx = torch.cat([p[0] for p in parts]).sort(-1).values
        mask = torch.cat([p[1] if p[1] is not None else torch.ones(p[0].shape[0], dtype=torch.bool)
                          for p in parts])
        out[layer] = (idx, mask)
    return out


def _maxvio(idx_NK: torch.Tensor, mask_N: torch.Tensor, num_experts: int) -> float:
    counts = torch.bincount(idx_NK[mask_N].reshape(-1), minlength=num_experts).double()
    return float(stats.maxvio(counts[None])[0])


def agreement(before: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
              after: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Per layer, share of real tokens whose set of chosen experts is the same in both recordings."""
    shares = []
    for layer in sorted(before):
        (a, mask), (b, _) = before[layer], after[layer]
        same = (a == b).all(-1)[mask]
        shares.append(float(same.double().mean()) if same.numel() else math.nan)
    return shares


def _generic_sites(state: Any) -> list[RouterSite]:
    """Routers whose bias lives only in the balancer (no native buffer carries it into the checkpoint)."""
    return [s for s in state.sites if s.native_owner is None and s.strategy != "native_bias"]


def _applied_sites(state: Any) -> list[RouterSite]:
    """Generic routers that apply a non-zero bias now: what stock transformers would not reproduce."""
    return [s for s in _generic_sites(state) if bool(state.balancer.applied_bias(s.layer).abs().max() > 0)]


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)} | \
        {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}


@torch.no_grad()
def fold_bias(model: torch.nn.Module, batches: Iterable[Any], *, check_batches: Iterable[Any] | None = None,
              ridge: float = 1e-4) -> FoldReport:
    """Fold the balancer's selection bias into the router weights of a patched ``model``, then zero it.

    Args:
        model: a model patched by :func:`moe_balance.patch` (or an integration).
        batches: calibration batches (input-id tensors or dicts with ``input_ids``/``attention_mask``),
            e.g. a few training batches; padding is left out. Only forwards run (no grad, nothing counted).
        check_batches: if given, the routing of these batches is recorded with the bias before the fold
            and without it after: ``report.agreement_L`` (per layer, 1.0 = identical choices).
        ridge: relative ridge on the input second moment (times its mean eigenvalue).

    Routers with a native bias buffer are left alone (their bias ships with the checkpoint already).
    Works on whole (unsharded) weights: under ZeRO-3 or FSDP2, fold after gathering the model (e.g. on
    the saved checkpoint loaded again, patched with the saved balancer state).
    """
    state = patch_state_of(model)
    if state is None:
        raise ValueError("moe_balance.export.fold_bias: the model is not patched (nothing to fold)")
    balancer = state.balancer
    if balancer.config.uses_bias and not balancer.config.ranks_logits:
        raise ValueError("moe_balance.export.fold_bias needs the bias in logit space (BalanceConfig.bias_space="
                         f"'logits', the default with 'quantile'); got bias_space={balancer.config.bias_space!r} "
                         f"with bias_update={balancer.config.bias_update!r}: a bias on probabilities is no "
                         "constant in logits")
    sites = _applied_sites(state)
    report = FoldReport()
    if not sites:
        return report
    check_batches = list(check_batches) if check_batches is not None else None
    before = None
    if check_batches is not None:
        rec = _Recorder(moments=False)
        _run(model, check_batches, rec)
        before = _selections(rec)
    recorder = _Recorder(moments=True)
    _run(model, batches, recorder)
    for site in sites:
        if site.layer not in recorder.sums:
            raise RuntimeError(f"moe_balance.export.fold_bias: router {site.name} ran no linear over "
                               f"{site.num_experts} outputs in the calibration batches; cannot fold its bias")
    # Every data-parallel rank folds the same delta: the moments are summed over the balancer's group (one
    # all-reduce, in layer order; every rank must call fold_bias).
    parts = [t for site in sites for t in recorder.sums[site.layer]]
    for part, total in zip(parts, balancer.reducer.sum_parts(parts)):
        part.copy_(total)
    names = _param_names(model)
    for site in sites:
        weight, lin_bias = recorder.linear[site.layer]
        for tensor in (weight, lin_bias):
            if tensor is not None and is_sharded(tensor):
                raise RuntimeError(f"moe_balance.export.fold_bias: router {site.name} is sharded (ZeRO-3 or FSDP2); "
                                   "fold on the gathered model (save it, load it whole, patch with the saved state)")
        bias_E = balancer.applied_bias(site.layer).detach().float().clone()
        n, sum_D, sum_DD = recorder.sums[site.layer]
        report.tokens = max(report.tokens, int(n))
        if lin_bias is not None:  # exact: the router's own constant
            lin_bias.add_(bias_E.to(lin_bias.device, lin_bias.dtype))
            report.layers[site.layer] = LayerFold(site.name, names.get(id(lin_bias), "?"), bias_E.cpu(), None, 1.0)
        else:
            mu_D = sum_D / n.clamp_min(1)
            S_DD = sum_DD / n.clamp_min(1)
            lam = ridge * float(torch.diagonal(S_DD).mean())
            a_D = torch.linalg.solve(S_DD + lam * torch.eye(S_DD.shape[0], dtype=S_DD.dtype, device=S_DD.device),
                                     mu_D)
            r2 = float(mu_D @ a_D)  # uncentred R^2 of regressing 1 on h
            delta_ED = bias_E.double().to(a_D.device)[:, None] * a_D[None, :]
            weight.add_(delta_ED.to(weight.device, weight.dtype))
            report.layers[site.layer] = LayerFold(site.name, names.get(id(weight), "?"), bias_E.cpu(),
                                                  a_D.float().cpu(), r2)
        balancer.bias_LE[site.layer].zero_()
    for callback in balancer.step_callbacks:
        callback(balancer)
    if check_batches is not None:
        rec = _Recorder(moments=False)
        _run(model, check_batches, rec)
        report.agreement_L = agreement(before, _selections(rec))
    balancer.fold_report = report
    return report


def plan_handover(model: torch.nn.Module, total_steps: int) -> tuple[int, int] | None:
    """Start the configured hand-over over ``total_steps`` (integrations call this at train begin). Not with
    absorption off (nothing would carry the routing once the bias is gone), nor where the generic routers
    cannot learn: frozen routers (LoRA, ``requires_grad=False``) keep the bias to the
    end and the fold at the end ships it instead (warned once)."""
    state = patch_state_of(model)
    balancer = state.balancer
    if balancer.config.handover_fraction == 0 or balancer.config.absorb_coef == 0:
        return None  # without absorption nothing would carry the routing once the bias is gone
    frozen = [s.name for s in _generic_sites(state) if not any(p.requires_grad for p in s.module.parameters())]
    if frozen:
        warnings.warn(f"moe_balance: {len(frozen)} routers are frozen (e.g. {frozen[0]}): they cannot learn the bias, "
                      "so there is no hand-over; the bias is folded into their weights at the end instead",
                      RuntimeWarning, stacklevel=2)
        return None
    return balancer.hand_over(total_steps)


@contextmanager
def as_stock(balancer: Any) -> Iterator[None]:
    """Route as the saved model will in stock transformers: generic routers apply no bias inside the block
    (a zero bias is bit-identical to the unpatched router); native bias buffers stay, as they ship."""
    saved = balancer.bias_scale.clone()
    balancer.bias_scale.zero_()
    try:
        yield
    finally:
        balancer.bias_scale.copy_(saved)


def ship(model: torch.nn.Module, batches: Iterable[Any] | None, limit: int | None = None) -> float:
    """End of training, for the integrations: fold whatever bias the generic routers still apply (nothing
    after a full hand-over) and return the lowest per-layer top-k agreement of the unbiased routing with
    the trained one (1.0 when no bias is applied: the patched model then routes exactly as stock).
    ``batches`` (e.g. the training dataloader; only read when there is something to fold, at most ``limit``
    of them) fit the fold on one half and measure agreement on the other; None where the trainer has none
    (NaN returned, warned)."""
    state = patch_state_of(model)
    balancer = state.balancer
    applied = _applied_sites(state)
    if not applied:
        return 1.0
    if not balancer.config.ranks_logits:
        warnings.warn(f"moe_balance: the bias of bias_update={balancer.config.bias_update!r} is added to probabilities "
                      "(bias_space='scores') and cannot be folded into router weights; the saved model will not "
                      "route as trained. Use bias_space='logits' (the quantile default) to ship it",
                      RuntimeWarning, stacklevel=2)
        return math.nan
    if any(is_sharded(p) for site in applied for p in site.module.parameters()):
        warnings.warn("moe_balance: the routers are sharded (ZeRO-3 / FSDP2) and still apply a bias, which cannot be "
                      "folded here; use handover_fraction (nothing to fold at the end), or fold the saved model: "
                      "load it whole, patch with its moe_balance.pt, moe_balance.export.fold_bias",
                      RuntimeWarning, stacklevel=2)
        return math.nan
    usable = []
    for batch in itertools.islice(batches or [], limit):
        try:
            usable.append(_as_inputs(batch))
        except TypeError:  # e.g. DPO's lists of prompt/chosen/rejected: nothing to route as is
            continue
    if not usable:
        warnings.warn("moe_balance: no training batches to fold the remaining bias with; the saved model will not "
                      "route as trained (call moe_balance.export.fold_bias)", RuntimeWarning, stacklevel=2)
        return math.nan
    report = fold_bias(model, usable[::2], check_batches=usable[1::2] or None)
    return report.min_agreement if report.min_agreement is not None else math.nan


def fold_tensors(report: FoldReport) -> dict[str, torch.Tensor]:
    out = {}
    for layer, fold in report.layers.items():
        out[f"{layer}.bias"] = fold.bias_E.contiguous()
        if fold.direction_D is not None:
            out[f"{layer}.direction"] = fold.direction_D.contiguous()
    return out


def save_pretrained(model: torch.nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(folder)`` plus ``moe_balance_fold.safetensors`` (what :func:`fold_bias` moved,
    so :func:`check_export` can rebuild the trained model). The weights are the stock model's."""
    folder = Path(folder)
    model.save_pretrained(folder, **kwargs)
    write_fold_record(model, folder)
    return folder


def write_fold_record(model: torch.nn.Module, folder: str | Path) -> Path | None:
    """Write ``moe_balance_fold.safetensors`` into ``folder`` for a patched model: what :func:`fold_bias` folded
    (nothing after a full hand-over: the trained model then applied no bias and is the saved one)."""
    from safetensors.torch import save_file
    state = patch_state_of(model)
    if state is None:
        return None
    report = getattr(state.balancer, "fold_report", None) or FoldReport()
    if not report.layers and _applied_sites(state):
        return None  # a bias is still applied and was not folded: no record claims this folder is what trained
    meta = {"config": state.balancer.config.to_json(),
            "layers": json.dumps({str(k): {"router": v.router, "param": v.param, "fit_r2": v.fit_r2}
                                  for k, v in report.layers.items()})}
    path = Path(folder) / FOLD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = fold_tensors(report) or {"none": torch.zeros(0)}  # safetensors wants at least one tensor
    save_file(tensors, str(path), metadata=meta)
    return path


def read_fold(folder: str | Path) -> tuple[dict[int, LayerFold], dict[str, Any]] | None:
    """The fold record of a saved folder (tensors only: nothing is unpickled), or None."""
    path = Path(folder) / FOLD_FILE
    if not path.exists():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = {}
    for key, info in json.loads(meta["layers"]).items():
        layers[int(key)] = LayerFold(info["router"], info["param"], tensors[f"{key}.bias"],
                                     tensors.get(f"{key}.direction"), float(info["fit_r2"]))
    return layers, json.loads(meta["config"])


@torch.no_grad()
def unfold(model: torch.nn.Module, layers: Mapping[int, LayerFold]) -> None:
    """Undo a fold on a stock-loaded model (the weights as trained, before :func:`fold_bias`)."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for fold in layers.values():
        if fold.param not in params:
            raise KeyError(f"moe_balance.export.unfold: {fold.param} is not a tensor of this model")
        target = params[fold.param]
        delta = fold.bias_E if fold.direction_D is None else fold.bias_E[:, None] * fold.direction_D[None, :]
        target.sub_(delta.to(target.device, target.dtype).reshape(target.shape))


def routing_report(model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
    """Loss and chosen experts of a patched ``model`` on ``batches`` (nothing is counted or moved)."""
    state = patch_state_of(model)
    rec = _Recorder(moments=False)
    losses = _run(model, batches, rec)
    selections = _selections(rec)
    E = state.sites[0].num_experts
    return {"loss": sum(losses) / max(1, len(losses)), "selections": selections,
            "maxvio_L": [_maxvio(*selections[layer], E) for layer in sorted(selections)]}


def check_export(folder: str | Path, batches: Iterable[Any], *, trained: torch.nn.Module | None = None,
                 auto_class: Any = None) -> dict[str, Any]:
    """Compare ``folder`` loaded by stock transformers with the trained (patched, biased) model.

    The trained model is ``trained`` if given, else rebuilt from the folder: its fold undone
    (``moe_balance_fold.safetensors``) and the folded bias put back under a patch. The stock model is
    routed through a measuring-only patch (``bias_update="none"``: bit-identical to stock, checked by the
    architecture parity tests). Returns per-layer top-k agreement, both losses and both MaxVio.
    """
    import moe_balance as mb
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    batches = list(batches)
    stock = auto_class.from_pretrained(str(folder))
    mb.patch(stock, bias_update="none", selftest=False)
    stock_run = routing_report(stock, batches)
    mb.unpatch(stock)
    if trained is None:
        record = read_fold(folder)
        state_path = Path(folder) / STATE_FILE
        if record is None and not state_path.exists():
            raise FileNotFoundError(f"moe_balance.check_export: {folder} has neither {FOLD_FILE} nor {STATE_FILE}; "
                                    "pass trained= (the patched model) to compare against it")
        trained = auto_class.from_pretrained(str(folder))
        if record is not None:  # shipped: undo the fold, put the folded bias back
            layers, config = record
            unfold(trained, layers)
            balancer = mb.patch(trained, config, selftest=False)
            for layer, fold in layers.items():
                balancer.bias_LE[layer].copy_(fold.bias_E)
        else:  # a checkpoint saved with its balancer state but not shipped: the bias as it was
            saved = load_state_file(state_path)
            mb.patch(trained, saved["_extra_state"]["config"], state=saved, selftest=False)
        trained_run = routing_report(trained, batches)
        mb.unpatch(trained)
    else:
        trained_run = routing_report(trained, batches)
    shares = agreement(trained_run["selections"], stock_run["selections"])
    return {"topk_agreement_L": shares, "topk_agreement_min": min(shares),
            "loss_trained": trained_run["loss"], "loss_stock": stock_run["loss"],
            "loss_diff": stock_run["loss"] - trained_run["loss"],
            "maxvio_trained": sum(trained_run["maxvio_L"]) / len(trained_run["maxvio_L"]),
            "maxvio_stock": sum(stock_run["maxvio_L"]) / len(stock_run["maxvio_L"]),
            "maxvio_trained_L": trained_run["maxvio_L"], "maxvio_stock_L": stock_run["maxvio_L"]}


def text_batches(folder: str | Path, files: list[str | Path] | None = None, *, batches: int = 8,
                 batch_size: int = 8, seq_len: int = 128) -> list[torch.Tensor]:
    """Evenly spaced ``[batch_size, seq_len]`` windows of some text, tokenized by the folder's tokenizer
    (or read as bytes when it has none and its vocabulary covers 256 ids). Default text: the Python
    standard library's held-out sources (offline, on every machine)."""
    from .testing import stdlib_corpus
    if files:
        text = b"".join(Path(f).read_bytes() for f in files)
    else:
        text = bytes(stdlib_corpus(max_bytes=2_000_000, split="val")[0].to(torch.uint8).tolist())
    if any(Path(folder, name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer
        ids = torch.tensor(AutoTokenizer.from_pretrained(str(folder))(text.decode("utf-8", "replace"))["input_ids"])
    else:
        config = json.loads(Path(folder, "config.json").read_text())
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 0)
        if vocab < 256:
            raise ValueError(f"moe_balance.check_export: {folder} has no tokenizer and vocab_size={vocab} < 256; "
                             "give text with a tokenizer folder")
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    need = batches * batch_size * seq_len
    if ids.numel() < need:
        raise ValueError(f"moe_balance.check_export: {ids.numel()} tokens of text, {need} needed")
    stride = ids.numel() // (batches * batch_size)
    windows = torch.stack([ids[i * stride:i * stride + seq_len] for i in range(batches * batch_size)])
    return list(windows.split(batch_size))


__all__ = ["fold_bias", "ship", "as_stock", "plan_handover", "text_batches", "save_pretrained", "write_fold_record",
           "check_export", "read_fold", "unfold", "agreement", "routing_report", "FoldReport", "LayerFold",
           "FOLD_FILE"]
