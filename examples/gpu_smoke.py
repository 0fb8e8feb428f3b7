"""GPU smoke test: moe-balance through a real HF Trainer on one CUDA GPU, as a pass/fail table.

    python examples/gpu_smoke.py                      # one CUDA GPU, about a minute or two (under 5)
    python examples/gpu_smoke.py --steps 60 --output-dir runs/gpu_smoke
    python examples/gpu_smoke.py --cpu --steps 16     # CI dry run on CPU: bf16 only, no fp16, no device_map

Without CUDA (and without ``--cpu``) it prints that it is skipped and exits 0. Otherwise it prints
one line per check as it finishes, then the table, and exits 1 if any row is FAIL (SKIP is not a
failure). Nothing is downloaded: each model is a tiny MoE built from a config, its routers skewed
towards low-numbered experts (a collapsed router), saved with ``save_pretrained`` and loaded back
with ``from_pretrained``, like a downloaded checkpoint. Data: byte windows (vocab 256) of the Python
standard library's own sources. Models: ``mixtral`` (generic top-k interception) and
``deepseek_v3`` (native ``e_score_correction_bias``), 2 MoE layers, 8 experts, top-2.

Rows (per model; precision ``bf16`` = ``TrainingArguments(bf16=True)``, ``fp16`` = ``fp16=True``,
i.e. autocast plus GradScaler loss scaling; fp16 rows run on CUDA only, bf16 rows need a GPU with
bf16 support):

* ``train``: ``--steps`` optimizer steps of ``Trainer`` + ``MoEBalanceCallback`` (sign bias
  u=1e-2 plus switch aux loss 1e-2). PASS: every logged loss is finite, the Trainer logs carry
  ``moe_balance/maxvio_global``, and ``balancer.num_steps`` counted the applied steps (all of them
  in bf16; at least one in fp16, where GradScaler may skip steps that overflowed).
* ``bias moves``: the bias alone (the default rule, Quantile Balancing; no aux loss) for
  max(``--steps``, 20) steps, against a control with no balancing at all (same seed and batches; its
  router collapses to MaxVio ~3 = two experts take everything). PASS: the price moved at the last step
  (``balancer.bias_LE``, or what the online fold moved into the router weights: the ``fold_moved_abs_max``
  metric) and the held-out MaxVio (``trainer.evaluate()``'s ``eval_moe_balance/maxvio_global``; evaluation
  leaves the bias alone) ends at least 10% below the start or below the control. Detail: start -> end (control).
  The default rule undoes the collapse within a few steps; the minimum leaves room for the router to pull back.
* ``aux -> router``: one step at learning rate 0 with ``aux_loss="switch", aux_loss_coef=1.0`` and
  the same step with ``aux_loss="none"``; router weight gradients are captured just before the
  optimizer step (the Trainer has unscaled fp16 gradients by then). PASS: the difference is at
  least 1e-3 of the plain gradient, and in bf16/fp16 its norm is within 10x of the fp32 one (the
  ``ratio``). The balance loss rides on the router output, so under fp16 it must be multiplied by
  the GradScaler's scale like the LM loss; missing that shows as a ratio near 1/65536 = 1.5e-5.
* ``resume``: ``--steps`` steps with a checkpoint at half way, then a fresh model and Trainer
  resumed from that checkpoint. PASS: the resumed run logs the same losses and per-step
  ``moe_balance/bias_abs_mean`` for the second half, and ends with the same ``balancer.bias_LE``
  and the same weights (the fused experts included: transformers' own resume drops them, #48805,
  and the callback repairs that). On CPU equality is bitwise. On CUDA the uninterrupted run is
  done twice and the resumed run may differ from it by at most 10x what those two differ by (plus
  1e-6): bitwise again on a deterministic GPU (attention is eager for that reason), while
  ``torch.use_deterministic_algorithms`` is not an option (it refuses NLLLoss on CUDA).
* ``device_map auto`` (CUDA): ``from_pretrained(..., device_map="auto")`` (all on the one GPU),
  then ``--steps`` Trainer steps. PASS: finite losses, a nonzero bias, the balancer on the GPU.
* ``device_map offload`` (CUDA): ``device_map="auto"`` with a ``max_memory`` budget for GPU 0 that
  is a bit smaller than the model, so some layers land on CPU (accelerate offload hooks). Then
  Trainer init (patching runs a self-test forward), a few steps and ``evaluate()``. PASS: no error,
  finite losses, balance measured on every layer. SKIP if no budget put a layer on CPU. (Offloaded
  weights are kept by accelerate outside the optimizer, so they do not train; the row checks that
  routing and balancing work on such a model, not that it learns.)

Uses only public names of moe_balance: ``find_routers``, ``moe_balance.testing.tiny_model`` and
``skew_routers``, ``moe_balance.integrations.hf.MoEBalanceCallback(**BalanceConfig fields)`` with
``callback.balancer`` (``bias_LE``, ``num_steps``, ``load_matrix()``, ``metrics()``) and the ``moe_balance/*`` keys
of the Trainer's logs and ``evaluate()`` metrics. Nothing reads the patch internals (loss scale,
devices, resume machinery), which may change; transformers/accelerate details it relies on are
commented where used.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import sysconfig
import tempfile
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import moe_balance as mb
from moe_balance.integrations.hf import MoEBalanceCallback
from moe_balance.testing import ByteWindows, skew_routers, tiny_model

MODELS = ("mixtral", "deepseek_v3")
RATE = 1e-2  # bias update rate: large, so that a few dozen steps move the balance visibly
BIAS_STEPS = 20  # steps of the runs that must show the balance (the default rule undoes a collapse in a few)
BALANCE = dict(bias_update="sign", bias_update_rate=RATE, aux_loss="switch", aux_loss_coef=1e-2)
SEQ, BATCH = 64, 8


# ----------------------------------------------------------------------------- table
@dataclass
class Row:
    check: str
    model: str
    precision: str
    status: str = "FAIL"
    detail: str = ""
    seconds: float = 0.0


def first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def short_map(dmap: dict) -> str:
    """``{"model.layers.0": 0, ...}`` as ``0: embed_tokens, layers.0; cpu: layers.1, norm, lm_head``."""
    groups: dict[str, list[str]] = {}
    for name, device in dmap.items():
        groups.setdefault(str(device), []).append(name.removeprefix("model.") or "(all)")
    return "; ".join(f"{device}: {', '.join(names)}" for device, names in groups.items())


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def run(self, check: str, model: str, precision: str, fn, *args) -> Row:
        """Run one check; ``fn`` returns ``(ok_or_"SKIP", detail)``. An exception is a FAIL row."""
        row, start = Row(check, model, precision), time.time()
        try:
            ok, row.detail = fn(*args)
            row.status = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
        except Exception as exc:  # a smoke test reports every failure and goes on
            row.status, row.detail = "FAIL", f"{type(exc).__name__}: {first_line(exc)}"
            traceback.print_exc(file=sys.stderr)
        row.seconds = time.time() - start
        self.rows.append(row)
        print(f"{row.status:4}  {check} [{model}, {precision}]  {row.detail}  ({row.seconds:.1f}s)", flush=True)
        return row

    def skip(self, check: str, model: str, precision: str, why: str) -> None:
        self.rows.append(Row(check, model, precision, "SKIP", why))
        print(f"SKIP  {check} [{model}, {precision}]  {why}", flush=True)

    def print(self, detail_width: int = 88) -> None:
        head = ("check", "model", "precision", "result", "s", "detail")
        cells = [head]
        for r in self.rows:  # long details continue on lines of their own
            parts = textwrap.wrap(r.detail, detail_width) or [""]
            cells.append((r.check, r.model, r.precision, r.status, f"{r.seconds:.1f}", parts[0]))
            cells += [("", "", "", "", "", more) for more in parts[1:]]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        print("\n" + " | ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        print("-+-".join("-" * w for w in widths))
        for c in cells[1:]:
            print(" | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        counts = {s: sum(r.status == s for r in self.rows) for s in ("PASS", "FAIL", "SKIP")}
        print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")


# ------------------------------------------------------------------------ data, models
def stdlib_bytes(limit: int, every: int, offset: int) -> torch.Tensor:
    """Bytes of the stdlib's own ``.py`` sources (every ``every``-th file from ``offset``), up to ``limit``;
    random bytes if this Python ships without them (some slim images keep only ``.pyc``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    blob = b""
    for path in sorted(root.glob("*.py"))[offset::every]:
        blob += path.read_bytes()
        if len(blob) >= limit:
            break
    if len(blob) < limit // 4:
        return torch.randint(0, 256, (limit,), generator=torch.Generator().manual_seed(offset))
    return torch.frombuffer(bytearray(blob[:limit]), dtype=torch.uint8).long()


def make_checkpoint(model_type: str, folder: Path, train: torch.Tensor) -> Path:
    """A tiny MoE with skewed routers, saved like a downloaded checkpoint."""
    model = tiny_model(model_type, seed=0, vocab_size=256)
    skew_routers(model, torch.stack([train[i * 997:i * 997 + SEQ] for i in range(8)]), strength=3.0)
    model.save_pretrained(folder)
    return folder


def router_param_names(model: torch.nn.Module) -> list[str]:
    names = [r["name"] for r in mb.find_routers(model)]
    return [n for n, _ in model.named_parameters() if any(n.startswith(r + ".") for r in names)]


# ---------------------------------------------------------------------------- context
class Smoke:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
        self.AutoModel, self.Trainer, self.TrainerCallback, self.TrainingArguments = (
            AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments)
        self.PrinterCallback = PrinterCallback
        self.cpu, self.steps, self.out, self.verbose = args.cpu, args.steps, out, args.verbose
        train = stdlib_bytes(1_000_000, 2, 0)
        val = stdlib_bytes(200_000, 10, 1)
        self.train_ds, self.val_ds = ByteWindows(train, SEQ, 4096), ByteWindows(val, SEQ, 64)
        self.folders = {m: make_checkpoint(m, out / f"ckpt_{m}", train) for m in args.models}

    def load_folder(self, folder: Path, **kwargs):
        return self.AutoModel.from_pretrained(folder, attn_implementation="eager", **kwargs)

    def load(self, model_type: str, **kwargs):
        # eager attention: SDPA's memory-efficient backward on CUDA is not deterministic (resume compares runs)
        return self.AutoModel.from_pretrained(self.folders[model_type], attn_implementation="eager", **kwargs)

    def targs(self, name: str, precision: str, **overrides):
        base = dict(output_dir=str(self.out / name), per_device_train_batch_size=BATCH,
                    per_device_eval_batch_size=16, learning_rate=1e-3, lr_scheduler_type="constant",
                    max_steps=self.steps, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, use_cpu=self.cpu,
                    bf16=precision == "bf16", fp16=precision == "fp16")
        base.update(overrides)
        return self.TrainingArguments(**base)

    def trainer(self, model, name: str, precision: str, callbacks, **overrides):
        trainer = self.Trainer(model=model, args=self.targs(name, precision, **overrides),
                               train_dataset=self.train_ds, eval_dataset=self.val_ds, callbacks=callbacks)
        if not self.verbose:  # the log dicts stay in trainer.state.log_history, not on the console
            trainer.remove_callback(self.PrinterCallback)
        return trainer


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h]


# ----------------------------------------------------------------------------- checks
def check_train(s: Smoke, model_type: str, precision: str):
    cb = MoEBalanceCallback(**BALANCE)
    trainer = s.trainer(s.load(model_type), f"train_{model_type}_{precision}", precision, [cb])
    trainer.train()
    logs = train_logs(trainer)
    losses = [h["loss"] for h in logs]
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    logged = bool(logs) and all("moe_balance/maxvio_global" in h for h in logs)
    n = cb.balancer.num_steps
    counted = n == s.steps if precision != "fp16" else 1 <= n <= s.steps
    if not losses:
        return False, "no loss logged"
    detail = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, balancer steps {n}/{s.steps}, "
              f"|bias|max {float(cb.balancer.bias_LE.abs().max()):.3g}")
    if not logged:
        detail += ", moe_balance/* missing from the Trainer logs"
    return finite and logged and counted, detail


def check_bias_moves(s: Smoke, model_type: str, precision: str):
    """The bias alone (no aux loss) against a control with no balancing at all, same seed and batches."""
    steps = max(s.steps, BIAS_STEPS)

    def run(name: str, **config) -> tuple[float, float, MoEBalanceCallback]:
        cb = MoEBalanceCallback(aux_loss="none", **config)
        trainer = s.trainer(s.load(model_type), f"{name}_{model_type}_{precision}", precision, [cb], max_steps=steps)
        start = trainer.evaluate()["eval_moe_balance/maxvio_global"]
        trainer.train()
        return start, trainer.evaluate()["eval_moe_balance/maxvio_global"], cb

    start, end, cb = run("bias")  # the default rule
    _, control, _ = run("control", bias_update="none")
    # the default folds the bias into the router weights after every step: what moved is the price it folded
    moved = max(float(cb.balancer.bias_LE.abs().max()), cb.balancer.metrics().get("fold_moved_abs_max", 0.0))
    lower = end < 0.9 * start or end < 0.9 * control  # 10% margin: held-out MaxVio has sampling noise
    return moved > 0 and lower, (f"{steps} steps: price moved {moved:.3g} at the last step, held-out MaxVio "
                                 f"{start:.2f} -> {end:.2f} (control without balancing {control:.2f})")


def check_ships(s: Smoke, model_type: str, precision: str):
    """The default config folds the bias into the router weights every step; trainer.save_model() then writes a
    model that stock transformers routes as trained, on this device and in this precision."""
    from moe_balance import export
    cb = MoEBalanceCallback(heatmap_every=0)
    steps = max(s.steps, BIAS_STEPS)
    trainer = s.trainer(s.load(model_type), f"ships_{model_type}_{precision}", precision, [cb], max_steps=steps)
    trainer.train()
    folder = s.out / f"ships_{model_type}_{precision}" / "saved"
    trainer.save_model(str(folder))
    model = trainer.model
    device = next(model.parameters()).device
    data = [torch.stack([s.val_ds[i]["input_ids"] for i in range(j, j + BATCH)]).to(device) for j in (0, BATCH)]
    trained = export.routing_report(model, data)  # the Trainer's model still runs under the run's autocast
    stock = s.load_folder(folder).to(device)
    import moe_balance as mb
    mb.patch(stock, bias_update="none", selftest=False)  # measuring only: a zero bias is bit-identical to stock
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
        served = export.routing_report(stock, data)  # served in the precision it was trained in
    shares = export.agreement(trained["selections"], served["selections"])
    ok = min(shares) >= 0.99 and abs(served["loss"] - trained["loss"]) < 5e-3
    return ok, (f"{steps} steps: export agreement {cb.export_agreement:.4f}, stock vs trained top-k agreement "
                f"min {min(shares):.4f}, loss {trained['loss']:.4f} -> {served['loss']:.4f}")


def router_grads(s: Smoke, model_type: str, precision: str, aux: str):
    grads: list[dict[str, torch.Tensor]] = []

    class Capture(s.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            names = set(router_param_names(model))
            grads.append({n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters()
                          if n in names and p.grad is not None})

    cb = MoEBalanceCallback(aux_loss=aux, aux_loss_coef=1.0, bias_update="none")
    # max_grad_norm=0: no clipping (the Trainer still unscales fp16 gradients when it measures their norm)
    trainer = s.trainer(s.load(model_type), f"aux_{model_type}_{precision}_{aux}", precision, [cb, Capture()],
                        max_steps=1, learning_rate=0.0, max_grad_norm=0.0)
    trainer.train()
    if not grads or not grads[0]:
        raise RuntimeError("no router gradient was captured")
    return grads[0], getattr(trainer.accelerator, "scaler", None)


def norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def check_aux(s: Smoke, model_type: str, precision: str, reference: dict):
    with_aux, scaler = router_grads(s, model_type, precision, "switch")
    without, _ = router_grads(s, model_type, precision, "none")
    delta = norm({n: with_aux[n] - without[n] for n in with_aux})
    plain = norm(without)
    detail = f"|dg| {delta:.3g} (|g| {plain:.3g})"
    if precision == "fp16":  # the row is only meaningful if the backward really ran at a loss scale
        if scaler is None or not scaler.is_enabled():
            return False, detail + ": no GradScaler active under fp16=True, loss scaling not exercised"
        detail += f", GradScaler scale after the step {scaler.get_scale():g}"
    if not math.isfinite(delta):
        return False, detail + ": non-finite gradient (an fp16 overflow in the first step?)"
    ok = delta >= 1e-3 * plain and delta > 0
    if precision == "fp32":
        reference[model_type] = delta
        return ok, detail
    ref = reference.get(model_type)
    if not ref:
        return False, detail + ", no fp32 reference"
    ratio = delta / ref
    return ok and 0.1 <= ratio <= 10, detail + f", ratio to fp32 {ratio:.3g}"


def resume_runs(s: Smoke, model_type: str, precision: str):
    """The uninterrupted run (twice on CUDA: its run-to-run noise is the tolerance) and the resumed one."""
    half = max(1, s.steps // 2)

    def run(name: str, resume: str | None = None) -> dict:
        cb = MoEBalanceCallback(**{**BALANCE, "aux_loss": "global_batch"})
        trainer = s.trainer(s.load(model_type), name, precision, [cb], save_strategy="steps", save_steps=half)
        trainer.train(resume_from_checkpoint=resume)
        return {"logs": {h["step"]: h for h in train_logs(trainer) if h["step"] > half},
                "bias": cb.balancer.bias_LE.detach().cpu().clone(),
                "weights": {n: t.detach().float().cpu().clone() for n, t in trainer.model.state_dict().items()}}

    full_name = f"resume_full_{model_type}_{precision}"
    full = run(full_name)
    checkpoint = s.out / full_name / f"checkpoint-{half}"
    if not checkpoint.is_dir():
        raise RuntimeError(f"no checkpoint at {checkpoint}")
    again = None if s.cpu else run(f"resume_again_{model_type}_{precision}")
    return half, full, again, run(f"resume_part_{model_type}_{precision}", str(checkpoint))


def differences(a: dict, b: dict, steps: list[int]) -> dict[str, float]:
    def rel(x: float, y: float) -> float:
        return abs(x - y) / max(1e-8, abs(y))
    return {"loss": max(rel(b["logs"][t]["loss"], a["logs"][t]["loss"]) for t in steps),
            "logged bias": max(abs(b["logs"][t].get("moe_balance/bias_abs_mean", math.nan)
                                   - a["logs"][t].get("moe_balance/bias_abs_mean", math.nan)) for t in steps),
            "bias": float((a["bias"] - b["bias"]).abs().max()),
            "weights": max(float((w - b["weights"][n]).abs().max()) for n, w in a["weights"].items())}


def check_resume(s: Smoke, model_type: str, precision: str):
    half, full, again, part = resume_runs(s, model_type, precision)
    steps = list(range(half + 1, s.steps + 1))
    if sorted(part["logs"]) != steps or sorted(full["logs"]) != steps:
        return False, f"logged steps {sorted(part['logs'])[:3]}..., expected {half + 1}..{s.steps}"
    diff = differences(full, part, steps)
    if again is None:  # CPU: bitwise
        tolerance = dict.fromkeys(diff, 0.0)
    else:  # CUDA: within 10x of what two uninterrupted runs differ by (0 when the GPU is deterministic)
        noise = differences(full, again, steps)
        floor = {"loss": 1e-6, "logged bias": 1e-7, "bias": 1e-7, "weights": 1e-6}
        tolerance = {k: 10 * noise[k] + floor[k] for k in diff}
    bad = [k for k in diff if not diff[k] <= tolerance[k]]
    moved = float(full["bias"].abs().max()) > 0
    first = next((t for t in steps if part["logs"][t]["loss"] != full["logs"][t]["loss"]), None)
    detail = f"steps {half + 1}-{s.steps} vs uninterrupted: " + ", ".join(f"{k} {v:.2g}" for k, v in diff.items())
    if bad:
        detail += f" (over tolerance: {', '.join(bad)}" + (f"; losses differ from step {first}" if first else "") + ")"
    if again is not None:
        detail += f"; run-to-run noise: loss {noise['loss']:.2g}, weights {noise['weights']:.2g}"
    if not moved:
        detail += "; the bias never moved"
    return not bad and moved, detail


def check_device_map_auto(s: Smoke, model_type: str, precision: str):
    model = s.load(model_type, device_map="auto")
    dmap = short_map(getattr(model, "hf_device_map", None) or {}) or "no hf_device_map"
    cb = MoEBalanceCallback(**BALANCE)
    trainer = s.trainer(model, f"dmap_{model_type}", precision, [cb])
    trainer.train()
    losses = [h["loss"] for h in train_logs(trainer)]
    bias = cb.balancer.bias_LE
    ok = bool(losses) and all(math.isfinite(v) for v in losses) and float(bias.abs().max()) > 0
    on_gpu = bias.device.type == "cuda"
    # Which device the balancer should follow is an internal choice; the routers all run on cuda here.
    return ok and on_gpu, (f"map {dmap}, balancer on {bias.device}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                           if losses else f"map {dmap}, no loss logged")


def check_device_map_offload(s: Smoke, model_type: str, precision: str):
    size = sum(p.numel() * p.element_size() for p in s.load(model_type).parameters())
    chosen = None
    for frac in (1.0, 0.95, 0.9, 0.8, 0.7, 0.5):  # accelerate keeps room on GPU 0 for the largest offloaded layer
        model = s.load(model_type, device_map="auto", max_memory={0: int(size * frac), "cpu": 8 << 30})
        dmap = getattr(model, "hf_device_map", None) or {}
        placed = {str(d) for d in dmap.values()}
        layers = {str(d) for k, d in dmap.items() if ".layers." in k}
        if "cpu" in placed and len(placed) > 1:
            if chosen is None or len(layers) > 1:
                chosen = (frac, model)
            if len(layers) > 1:  # decoder layers split between the GPU and the CPU: the best case
                break
        del model
    if chosen is None:
        return "SKIP", f"no max_memory budget put a layer on CPU (model {size} bytes)"
    frac, model = chosen
    dmap = short_map(model.hf_device_map)
    cb = MoEBalanceCallback(**BALANCE)
    try:  # the callback patches (and self-tests) the routers inside Trainer.__init__
        trainer = s.trainer(model, f"offload_{model_type}", precision, [cb], max_steps=min(4, s.steps))
    except Exception as exc:
        return False, f"{dmap} -> Trainer(...) raised {type(exc).__name__}: {first_line(exc)}"
    trainer.train()
    losses = [h["loss"] for h in train_logs(trainer)]
    trainer.evaluate()
    loads = cb.balancer.load_matrix()  # [layers, experts] counts of the evaluation window
    seen = int((loads.sum(-1) > 0).sum())
    ok = bool(losses) and all(math.isfinite(v) for v in losses) and seen == loads.shape[0]
    return ok, f"GPU budget {frac:.0%} of {size} bytes -> {dmap}; {seen}/{loads.shape[0]} layers measured in eval"


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per training run (default 40)")
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU: bf16 only, no fp16, no device_map")
    parser.add_argument("--output-dir", help="keep checkpoints and Trainer outputs here (default: a temp dir)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--verbose", action="store_true", help="show transformers / moe_balance warnings")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (resume checks a checkpoint at half way)")

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_smoke: SKIPPED, no CUDA device (torch.cuda.is_available() is False); "
              "use --cpu for the CPU dry run")
        return 0
    if not args.verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        logging.getLogger("moe_balance").setLevel(logging.ERROR)

    where = "CPU dry run" if args.cpu else f"CUDA: {torch.cuda.get_device_name(0)}"
    import transformers
    print(f"gpu_smoke: {where}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"moe_balance {mb.__version__}; {args.steps} steps per run", flush=True)
    started = time.time()
    tmp = None
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu_smoke_")
        out = Path(tmp.name)
    try:
        table = run_checks(args, out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    table.print()
    print(f"total {time.time() - started:.0f}s")
    return 1 if any(r.status == "FAIL" for r in table.rows) else 0


def bf16_gpu() -> bool:
    """Native bf16 (what ``TrainingArguments(bf16=True)`` accepts), not the emulation on older GPUs."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch
        return torch.cuda.is_bf16_supported()


def run_checks(args: argparse.Namespace, out: Path) -> Table:
    torch.manual_seed(0)
    s = Smoke(args, out)
    table = Table()
    bf16_ok = args.cpu or bf16_gpu()
    precisions = ["bf16"] if args.cpu else ["bf16", "fp16"]
    usable = [p for p in precisions if p != "bf16" or bf16_ok]
    reference: dict = {}
    for model_type in args.models:
        for precision in precisions:
            if precision not in usable:
                for check in ("train", "bias moves", "ships as trained", "resume"):
                    table.skip(check, model_type, precision, "this GPU has no bf16")
                continue
            table.run("train", model_type, precision, check_train, s, model_type, precision)
            table.run("bias moves", model_type, precision, check_bias_moves, s, model_type, precision)
            table.run("ships as trained", model_type, precision, check_ships, s, model_type, precision)
        for precision in ["fp32"] + usable:
            table.run("aux -> router", model_type, precision, check_aux, s, model_type, precision, reference)
        for precision in usable:
            table.run("resume", model_type, precision, check_resume, s, model_type, precision)
        if args.cpu:
            table.skip("device_map auto", model_type, "-", "--cpu")
            table.skip("device_map offload", model_type, "-", "--cpu")
        else:
            precision = usable[0]
            table.run("device_map auto", model_type, precision, check_device_map_auto, s, model_type, precision)
            table.run("device_map offload", model_type, precision, check_device_map_offload, s, model_type,
                      precision)
    return table


if __name__ == "__main__":
    sys.exit(main())
