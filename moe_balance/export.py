"""Ship what was trained: a patched model routes, without moe-balance, as it did in training.

Stock transformers, vLLM, SGLang and llama.cpp read only a checkpoint's weights and config. A selection
bias survives there only where the architecture has a buffer for it (DeepSeek-V3's
``e_score_correction_bias``, written back by the patch). For every other router the online fold
(:mod:`moe_balance.fold`, ``BalanceConfig.fold_share``) moves the bias into the router weights after every
step, so the weights carry the routing throughout and a checkpoint saved at any step is what trained.

This module handles what is left: :func:`fold_bias` folds a remaining bias (a run with ``fold_share < 1``
or 0, layers whose inputs did not fit yet) along the online direction, or estimates one from calibration
batches (conjugate gradients, one iteration per batch: ``L x d`` state, never ``d x d``);
:func:`save_pretrained` writes the folder plus ``moe_balance_fold.safetensors`` (what was folded at the end,
so the trained model can be rebuilt), and :func:`check_export` compares a saved folder loaded by stock
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
from .config import without_retired
from . import fold as fold_math
from .fold import cg_step, input_statistics
from .patching.api import folded_sites, patch_state_of
from .patching.folding import fold_targets
from .patching.strategies import RouterSite, full_shape, is_sharded
from .weights import add_to_param

FOLD_FILE = "moe_balance_fold.safetensors"
STATE_FILE = "moe_balance.pt"  # what the integrations save beside a checkpoint
CALIBRATION_ITERATIONS = 32
"""Forwards the end fold's calibration takes at least (cycling its batches) where no online direction exists."""


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
    maxvio_before_L: list[float] | None = None
    """Per layer: MaxVio of the check batches with the bias applied (as trained)."""
    maxvio_after_L: list[float] | None = None
    """Per layer: MaxVio of the check batches after the fold (as shipped)."""

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
    """Per layer: chosen experts (with the mask) and, with ``directions``, the fold's input statistics
    (``moe_balance.fold.input_statistics`` against the current CG iterate ``v``/``p`` of that layer)."""

    def __init__(self, directions: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.directions = directions
        self.selections: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.sums: dict[int, list[torch.Tensor]] = {}  # [3, D] sums and [2] scalars (fp64)

    def __call__(self, site: RouterSite, indices: torch.Tensor, linear_call: tuple | None) -> None:
        T = indices.reshape(-1, indices.shape[-1]).shape[0]
        mask = site.state.batch.mask_for(T)
        self.selections.setdefault(site.layer, []).append(
            (indices.reshape(T, -1).detach().cpu(), None if mask is None else mask.reshape(T).bool().cpu()))
        if self.directions is None or linear_call is None:
            return
        x_TD = linear_call[0].detach().reshape(T, -1)
        weight_T = torch.ones(T, device=x_TD.device) if mask is None else mask.reshape(T).to(x_TD.device).float()
        v_LD, p_LD = self.directions
        sums_3D, scalars_2 = input_statistics(x_TD, weight_T, v_LD[site.layer], p_LD[site.layer])
        sums = self.sums.setdefault(site.layer, [torch.zeros_like(sums_3D), torch.zeros_like(scalars_2)])
        sums[0] += sums_3D.to(sums[0].device)
        sums[1] += scalars_2.to(sums[1].device)


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


def _applied_sites(state: Any) -> list[RouterSite]:
    """Generic routers that apply a non-zero bias now: what stock transformers would not reproduce."""
    return [s for s in folded_sites(state) if bool(state.balancer.applied_bias(s.layer).abs().max() > 0)]


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)} | \
        {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}


@torch.no_grad()
def estimate_direction(model: torch.nn.Module, batches: Iterable[Any], iterations: int = CALIBRATION_ITERATIONS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold direction ``a_LD`` and fit ``R^2`` per layer from calibration batches: one conjugate-gradient
    iteration per batch (the estimator the online fold runs once per step), cycling through ``batches`` for at
    least ``iterations`` forwards; sums over the balancer's ranks with one all-reduce per forward (every rank must
    call it with as many batches). ``L x d`` state."""
    state = patch_state_of(model)
    balancer = state.balancer
    dims = {full_shape(t[0])[1] for t in (fold_targets(s) for s in folded_sites(state)) if t is not None}
    if len(dims) != 1:
        raise RuntimeError(f"moe_balance.export: the generic routers have no common [E, D] weight to fold into "
                           f"(widths {sorted(dims)})")
    L, D = balancer.num_layers, dims.pop()
    home = balancer.bias_LE.device
    v_LD, p_LD = (torch.zeros(L, D, dtype=torch.float64, device=home) for _ in range(2))
    a_LD, fit_L = torch.zeros_like(v_LD), torch.zeros(L, dtype=torch.float64, device=home)
    batches = list(batches)
    for batch in itertools.islice(itertools.cycle(batches), max(iterations, len(batches))):
        recorder = _Recorder((v_LD, p_LD))
        _run(model, [batch], recorder)
        sums_L3D = torch.zeros(L, 3, D, dtype=torch.float64, device=home)
        scalars_L2 = torch.zeros(L, 2, dtype=torch.float64, device=home)
        for layer, (sums_3D, scalars_2) in recorder.sums.items():
            sums_L3D[layer], scalars_L2[layer] = sums_3D.to(home), scalars_2.to(home)
        sums_L3D, scalars_L2 = balancer.reducer.sum_parts([sums_L3D, scalars_L2])
        a_LD, fit_L = cg_step(v_LD, p_LD, sums_L3D, scalars_L2)
    return a_LD, fit_L


@torch.no_grad()
def fold_bias(model: torch.nn.Module, batches: Iterable[Any] | None = None, *,
              check_batches: Iterable[Any] | None = None) -> FoldReport:
    """Fold the bias the generic routers of a patched ``model`` still apply into their weights, then zero it.

    Args:
        model: a model patched by :func:`moe_balance.patch` (or an integration).
        batches: calibration batches (input-id tensors or dicts with ``input_ids``/``attention_mask``), e.g. a
            few training batches; padding is left out. Needed only where the online fold has no direction yet
            (``fold_share=0``, a fresh patch with a saved state); every layer fits again on them then.
        check_batches: if given, the routing of these batches is recorded with the bias before the fold
            and without it after: ``report.agreement_L`` (per layer, 1.0 = identical choices).

    Routers with a native bias buffer are left alone (their bias ships with the checkpoint already). Sharded
    weights (ZeRO-3, FSDP2) are edited shard by shard (:mod:`moe_balance.weights`).
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
        rec = _Recorder()
        _run(model, check_batches, rec)
        before = _selections(rec)
    online = balancer.router_dim is not None and all(
        bool(fold_math.fold_ready(balancer.fold_fit_L, balancer.fold_started_L)[s.layer]) for s in sites)
    if online:
        a_LD, fit_L = balancer.fold_a_LD, balancer.fold_fit_L
    else:
        if batches is None:
            raise ValueError("moe_balance.export.fold_bias: no online fold direction for every router (fold_share=0 "
                             "or too few steps); give calibration batches=")
        a_LD, fit_L = estimate_direction(model, batches)
    names = _param_names(model)
    for site in sites:
        targets = fold_targets(site)
        if targets is None:
            raise RuntimeError(f"moe_balance.export.fold_bias: router {site.name} has no [E, D] weight to fold into")
        weight, lin_bias = targets
        bias_E = balancer.applied_bias(site.layer).detach().double().clone()
        if lin_bias is not None:  # exact: the router's own constant
            add_to_param(lin_bias, bias_E)
            report.layers[site.layer] = LayerFold(site.name, names.get(id(lin_bias), "?"), bias_E.float().cpu(),
                                                  None, 1.0)
        else:
            a_D = a_LD[site.layer].to(bias_E.device)
            add_to_param(weight, bias_E[:, None] * a_D[None, :])
            report.layers[site.layer] = LayerFold(site.name, names.get(id(weight), "?"), bias_E.float().cpu(),
                                                  a_D.float().cpu(), float(fit_L[site.layer]))
        balancer.bias_LE[site.layer].zero_()
    for callback in balancer.step_callbacks:
        callback(balancer)
    if check_batches is not None:
        rec = _Recorder()
        _run(model, check_batches, rec)
        after = _selections(rec)
        report.agreement_L = agreement(before, after)
        E = sites[0].num_experts
        report.maxvio_before_L = [_maxvio(*before[layer], E) for layer in sorted(before)]
        report.maxvio_after_L = [_maxvio(*after[layer], E) for layer in sorted(after)]
    balancer.fold_report = report
    return report


def ship(model: torch.nn.Module, batches: Iterable[Any] | None, limit: int | None = None) -> dict[str, float]:
    """End of training, for the integrations: fold whatever bias the generic routers still apply along the online
    direction (what the last steps' fold had not moved yet) and report how the shipped routing compares.

    Returns ``routing_differ`` (share of the last training step's tokens whose experts the same weights without
    the bias chose otherwise), and, measured on up to ``limit`` of ``batches`` (e.g. the training dataloader):
    ``topk_agreement`` (lowest per-layer share of tokens routed the same with the remainder as trained and
    folded as shipped; 1.0 when nothing was left), ``maxvio_trained`` and ``maxvio_served`` (mean over layers,
    with the remainder applied and as stock transformers will route the saved model). Sharded models (ZeRO-3,
    FSDP2) are folded shard by shard but not run here: a forward outside the engine would leave their
    parameters gathered, so the three measured values are NaN there."""
    state = patch_state_of(model)
    balancer = state.balancer
    out = {"routing_differ": balancer.metrics().get("routing_differ", math.nan) if balancer.last_window else 0.0,
           "topk_agreement": math.nan, "maxvio_trained": math.nan, "maxvio_served": math.nan}
    # any sharded parameter, not only the routers': a native-bias model under ZeRO-3 has no folded site
    sharded = any(is_sharded(p) for p in model.parameters())
    usable = []
    for batch in itertools.islice(batches or [], 0 if sharded else limit):
        try:
            usable.append(_as_inputs(batch))
        except TypeError:  # e.g. DPO's lists of prompt/chosen/rejected: nothing to route as is
            continue
    if not _applied_sites(state):
        if usable:
            out["maxvio_trained"] = out["maxvio_served"] = _mean(routing_report(model, usable)["maxvio_L"])
        out["topk_agreement"] = 1.0
        return out
    if not balancer.config.ranks_logits:
        warnings.warn(f"moe_balance: the bias of bias_update={balancer.config.bias_update!r} is added to "
                      "probabilities (bias_space='scores') and cannot be folded into router weights; the saved "
                      "model will not route as trained. Use bias_space='logits' (the quantile default) to ship it",
                      RuntimeWarning, stacklevel=2)
        return out
    try:
        report = fold_bias(model, usable or None, check_batches=usable or None)
    except ValueError as error:
        warnings.warn(f"moe_balance: the remaining bias was not folded ({error}); the saved model will not "
                      "route as trained", RuntimeWarning, stacklevel=2)
        return out
    if report.agreement_L is not None:
        out["topk_agreement"] = report.min_agreement
        out["maxvio_trained"], out["maxvio_served"] = _mean(report.maxvio_before_L), _mean(report.maxvio_after_L)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


@contextmanager
def as_stock(balancer: Any) -> Iterator[None]:
    """Route as the saved model will in stock transformers: generic routers apply no bias (a zero bias is
    bit-identical to the unpatched router); native bias buffers are not touched, as they ship."""
    saved = balancer.bias_LE.clone()
    balancer.bias_LE.zero_()
    try:
        yield
    finally:
        balancer.bias_LE.copy_(saved)


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
    (nothing with fold_share=1: the trained model then applied no bias and is the saved one)."""
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
    rec = _Recorder()
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
            config = without_retired(config)
            unfold(trained, layers)
            balancer = mb.patch(trained, config, selftest=False)
            for layer, fold in layers.items():
                balancer.bias_LE[layer].copy_(fold.bias_E)
        else:  # a checkpoint saved with its balancer state but not shipped: the bias as it was
            saved = load_state_file(state_path)
            mb.patch(trained, without_retired(saved["_extra_state"]["config"]), state=saved, selftest=False)
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


__all__ = ["fold_bias", "estimate_direction", "ship", "as_stock", "text_batches", "save_pretrained",
           "write_fold_record",
           "check_export", "read_fold", "unfold", "agreement", "routing_report", "FoldReport", "LayerFold",
           "FOLD_FILE"]
