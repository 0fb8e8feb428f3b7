"""ms-swift: ``--external_plugins "$(python -m moe_balance.integrations.swift --path)" --callbacks moe_balance``
added to a real ``swift pt`` run (its entry point ``swift/cli/pt.py``, on CPU) of a tiny Qwen3-MoE with collapsed
routers, against the same run without it; the saved checkpoints are judged loaded by stock transformers.

ms-swift 4.6 pins transformers < 5.20 and trl < 1.0: ``.ci/compat`` runs these in a fresh venv of their own
(torch 2.13.0, ``ms-swift==4.6.0``, the project installed without its dependency pins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("swift")
pytest.importorskip("swift.callbacks", reason="ms-swift < 4 has no swift.callbacks.callbacks_map")

from moe_balance.integrations import swift as mb_swift  # noqa: E402
from moe_balance.integrations.hf import MoEBalanceCallback  # noqa: E402

from .conftest import ROOT  # noqa: E402

STEPS = 40


def test_options_come_from_the_environment_and_are_checked():
    assert mb_swift.options({}) == {}
    assert mb_swift.options({"MOE_BALANCE": '{"aux_loss": "global_batch", "aux_loss_coef": 1e-3, '
                                            '"heatmap_every": 0, "keep_model_aux_loss": true}'}) == {
        "aux_loss": "global_batch", "aux_loss_coef": 1e-3, "heatmap_every": 0, "keep_model_aux_loss": True}
    # swift's YAML ``ENV:`` section hands a mapping over as str(dict)
    assert mb_swift.options({"MOE_BALANCE": str({"bias_update": "sign", "ship": False})}) == {
        "bias_update": "sign", "ship": False}
    with pytest.raises(ValueError, match="did you mean 'bias_update'"):
        mb_swift.options({"MOE_BALANCE": '{"bias_updte": "sign"}'})
    with pytest.raises(ValueError, match="JSON object"):
        mb_swift.options({"MOE_BALANCE": "aux_loss=global_batch"})


def test_plugin_file_registers_the_callback_in_swifts_table(tmp_path, monkeypatch, capsys):
    from swift.callbacks import callbacks_map
    from swift.utils.utils import import_external_file
    monkeypatch.setitem(callbacks_map, mb_swift.NAME, None)  # undone at teardown, whatever register() adds
    del callbacks_map[mb_swift.NAME]
    monkeypatch.setenv("MOE_BALANCE", '{"bias_update": "sign", "heatmap_every": 0}')
    assert mb_swift.main(["--path", "--folder", str(tmp_path / "plugin")]) == 0
    path = capsys.readouterr().out.strip()
    assert os.listdir(tmp_path / "plugin") == ["moe_balance_swift_plugin.py"]  # swift puts this folder on sys.path
    import_external_file(path)  # what --external_plugins does
    try:
        cb = callbacks_map[mb_swift.NAME](None, None)  # what --callbacks moe_balance does: name(args, trainer)
    finally:
        sys.path.remove(os.path.dirname(path))
    assert isinstance(cb, MoEBalanceCallback)
    assert (cb.config.bias_update, cb.heatmap_every) == ("sign", 0)
    monkeypatch.setenv("MOE_BALANCE", '{"aux_los": "seq"}')
    with pytest.raises(ValueError, match="did you mean 'aux_loss'"):  # at plugin import, before the model loads
        mb_swift.register({})


def test_register_without_swift_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "swift.callbacks", None)
    with pytest.raises(ImportError, match="pip install ms-swift"):
        mb_swift.register()


def _tiny_model_and_data(folder):
    """A tiny Qwen3-MoE whose routers are collapsed (``skew_routers``) and which asks for its pooled aux loss
    (``output_router_logits=True``, as some released MoE configs do), a byte-level BPE tokenizer trained here,
    a JSONL of stdlib text for training and held-out token windows from other stdlib files (no downloads)."""
    from moe_balance.testing import byte_bpe_tokenizer, skew_routers, stdlib_files, tiny_model
    files = stdlib_files()
    texts = [p.read_text(errors="ignore") for p in files[:40]]
    fast = byte_bpe_tokenizer(texts)
    model = tiny_model("qwen3_moe", vocab_size=len(fast), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       output_router_logits=True)
    sample = torch.tensor(fast("".join(texts[:8]))["input_ids"][:512]).view(8, 64)
    skew_routers(model, sample, strength=3.0)
    model.save_pretrained(folder / "tiny")
    fast.save_pretrained(folder / "tiny")
    with open(folder / "data.jsonl", "w") as f:
        for text in texts:
            for i in range(0, min(len(text), 6000), 300):
                f.write(json.dumps({"text": text[i:i + 300]}) + "\n")
    held_out = fast("".join(p.read_text(errors="ignore") for p in files[300:340]))["input_ids"]
    windows = torch.tensor(held_out[:64 * 128]).view(64, 128)
    return folder / "tiny", list(windows.split(16))


@torch.no_grad()
def _stock_heldout(folder, batches):
    """Loss and MaxVio (max expert load / mean - 1, mean over layers) of ``folder`` loaded by stock transformers,
    read from the router logits the model itself returns: no moe_balance code touches it."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    counts, losses = None, []
    for ids in batches:
        out = model(input_ids=ids, output_router_logits=True)  # no labels: the loss below has no aux term
        chosen = [logits.topk(k, dim=-1).indices.flatten() for logits in out.router_logits]
        step = torch.stack([torch.bincount(c, minlength=experts) for c in chosen]).double()
        counts = step if counts is None else counts + step
        logits = out.logits[:, :-1].flatten(0, 1)
        losses.append(float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten())))
    maxvio = counts.max(-1).values / counts.mean(-1) - 1
    return sum(losses) / len(losses), float(maxvio.mean())


def _swift_pt(tmp_path, name, model, moe_balance):
    """``swift pt`` on CPU, as its launcher runs it (``python swift/cli/pt.py ...``), from a shell so that the
    documented line is used verbatim."""
    import shlex

    from swift.cli import pt
    out = tmp_path / name
    cmd = [sys.executable, pt.__file__, "--model", str(model), "--model_type", "qwen3_moe", "--template", "qwen3",
           "--use_hf", "true", "--check_model", "false", "--dataset", str(tmp_path / "data.jsonl"),
           "--tuner_type", "full", "--torch_dtype", "float32", "--max_length", "64", "--truncation_strategy", "right",
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_steps", str(STEPS),
           "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--logging_steps", "5",
           "--save_strategy", "steps", "--save_steps", str(STEPS), "--save_only_model", "true",
           "--report_to", "none", "--output_dir", str(out), "--add_version", "false", "--seed", "0",
           "--dataloader_num_workers", "0", "--dataset_num_proc", "1"]
    line = ('--external_plugins "$(python -m moe_balance.integrations.swift --path)" --callbacks moe_balance'
            if moe_balance else "")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms"),
           "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",  # ModelScope has no offline switch: nothing listens here
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "MOE_BALANCE": "",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-c", f"{shlex.join(cmd)} {line}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


@pytest.mark.slow
def test_swift_pt_with_the_one_line_ships_a_balanced_model(tmp_path):
    from moe_balance import export
    model, heldout = _tiny_model_and_data(tmp_path)
    start_loss, start_maxvio = _stock_heldout(model, heldout)

    runs = {}
    for name, on in (("plain", False), ("moe_balance", True)):
        out, proc = _swift_pt(tmp_path, name, model, on)
        ckpt = out / f"checkpoint-{STEPS}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
        runs[name] = dict(ckpt=ckpt, proc=proc, logs=[h for h in state["log_history"] if "loss" in h],
                          swift_logs=[h for h in logs if "loss" in h], heldout=_stock_heldout(ckpt, heldout))

    plain, mb = runs["plain"], runs["moe_balance"]
    # balance metrics in the trainer's log_history and in swift's own logging.jsonl, at every logging step
    assert len(mb["logs"]) == STEPS // 5 + 1 and all("moe_balance/maxvio_global" in h for h in mb["logs"])
    assert all("moe_balance/maxvio_global" in h for h in mb["swift_logs"])
    assert not any(k.startswith("moe_balance/") for h in plain["logs"] for k in h)
    # swift's aux loss: the checkpoint asks for it (output_router_logits), swift computes it (coef 0) in the plain
    # run; the callback switched it off, said so, and nothing computed it
    assert all("aux_loss" in h for h in plain["swift_logs"])
    assert not any("aux_loss" in h for h in mb["swift_logs"])
    assert "router aux loss is switched off" in mb["proc"].stderr
    assert json.loads((mb["ckpt"] / "config.json").read_text())["output_router_logits"] is False
    # the saved model, loaded by stock transformers, routes as trained (the online fold) ...
    check = export.check_export(mb["ckpt"], heldout[:2])
    assert check["topk_agreement_min"] == 1.0, check
    # ... and is balanced on held-out text, at the loss of the plain run
    (plain_loss, plain_maxvio), (mb_loss, mb_maxvio) = plain["heldout"], mb["heldout"]
    print(f"held-out, stock transformers: start loss {start_loss:.4f} MaxVio {start_maxvio:.3f}; after {STEPS} "
          f"steps plain loss {plain_loss:.4f} MaxVio {plain_maxvio:.3f}; moe_balance loss {mb_loss:.4f} "
          f"MaxVio {mb_maxvio:.3f}; last train loss plain {plain['logs'][-1]['loss']:.4f} "
          f"moe_balance {mb['logs'][-1]['loss']:.4f}")
    assert start_maxvio > 1.5 and plain_maxvio > 1.0 and plain_loss < start_loss - 0.3
    assert mb_maxvio < 0.5 * plain_maxvio
    assert mb_loss < plain_loss + 0.05
