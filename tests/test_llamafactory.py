"""LlamaFactory: ``python -m moe_balance.integrations.llamafactory train cfg.yaml`` in place of
``llamafactory-cli train cfg.yaml``, end to end on CPU through LlamaFactory's own ``run_exp``.

LlamaFactory pins transformers <= 5.6 and trl <= 0.24: ``.ci/compat`` runs this in a fresh venv of its own
(torch 2.13.0, ``llamafactory==0.9.5``, the project installed without its dependency pins). PyPI's torchvision
and torchaudio wheels are CUDA builds that do not load beside the CPU torch: ``.ci/compat`` uninstalls
torchvision and removes ``torchaudio/lib/*.so`` (LlamaFactory imports torchaudio; a text run never calls it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("llamafactory")
yaml = pytest.importorskip("yaml")

from moe_balance.integrations.llamafactory import split_args  # noqa: E402

from .conftest import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "llamafactory" / "qwen3_moe_full_pt.yaml"
STEPS = 40


def test_section_is_taken_out_and_validated():
    args, kwargs = split_args({"stage": "pt", "moe_balance": {"aux_loss": "global_batch", "heatmap_every": 0,
                                                              "keep_model_aux_loss": True}})
    assert args == {"stage": "pt"}
    assert kwargs == {"aux_loss": "global_batch", "heatmap_every": 0, "keep_model_aux_loss": True}
    assert split_args({"stage": "pt"}) == ({"stage": "pt"}, {})
    with pytest.raises(ValueError, match="did you mean 'bias_update'"):
        split_args({"moe_balance": {"bias_updte": "sign"}})


def test_llamafactory_refuses_the_section_itself():
    """Why the section is taken out: LlamaFactory's HfArgumentParser refuses unknown keys."""
    from llamafactory.hparams import get_train_args
    with pytest.raises(ValueError, match="moe_balance"):
        get_train_args({"model_name_or_path": "x", "stage": "pt", "do_train": True, "output_dir": "o",
                        "moe_balance": {}})


def _tiny_model_tokenizer_and_data(folder):
    """A tiny Qwen3-MoE with collapsed routers, a byte-level BPE tokenizer trained here and a LlamaFactory
    dataset of stdlib text from the training split (``export.text_batches`` holds out the other files)."""
    import torch
    from moe_balance.testing import byte_bpe_tokenizer, skew_routers, stdlib_files, tiny_model
    files = [p for i, p in enumerate(stdlib_files()) if i % 10 != 0][:40]  # every 10th file is held out
    texts = [p.read_text(errors="ignore")[:10000] for p in files]
    fast = byte_bpe_tokenizer(texts)
    model = tiny_model("qwen3_moe", vocab_size=len(fast), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    sample = torch.tensor(fast("".join(texts[:4]))["input_ids"][:8 * 64]).reshape(8, 64)
    skew_routers(model, sample, strength=3.0)
    model.save_pretrained(folder / "tiny")
    fast.save_pretrained(folder / "tiny")
    with open(folder / "data.jsonl", "w") as f:
        for text in texts:
            for i in range(0, len(text), 1000):
                f.write(json.dumps({"text": text[i:i + 1000]}) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps(
        {"stdlib": {"file_name": "data.jsonl", "columns": {"prompt": "text"}}}))


def _train(folder, name, balance):
    """The example YAML on the tiny model, in a fresh process: through ``llamafactory-cli``'s entry point without
    its ``moe_balance`` section, or through this integration with it. LlamaFactory's own aux loss is on in both."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    section = cfg.pop("moe_balance")
    assert cfg["moe_aux_loss_coef"] > 0 and cfg["stage"] == "pt" and cfg["finetuning_type"] == "full"
    for key in ("num_train_epochs", "save_steps", "bf16"):
        cfg.pop(key)
    cfg.update(model_name_or_path=str(folder / "tiny"), dataset="stdlib", dataset_dir=str(folder), cutoff_len=128,
               overwrite_cache=True, output_dir=str(folder / name), per_device_train_batch_size=8,
               gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", max_steps=STEPS,
               logging_steps=5, save_strategy="no", report_to="none", plot_loss=False, seed=0,
               moe_aux_loss_coef=1e-2)
    if balance:
        cfg["moe_balance"] = {**section, "heatmap_every": 0}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    command = ([sys.executable, "-m", "moe_balance.integrations.llamafactory"] if balance else
               [os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf"),
           "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # 2 threads on a shared 2-core machine: 35 s of training instead of 2.3
    proc = subprocess.run([*command, "train", str(folder / f"{name}.yaml")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folder / name


def _served(folder, batches):
    """Held-out loss and MaxVio of a saved folder loaded by stock transformers (a measuring-only patch records
    the experts chosen: bit-identical routing)."""
    import moe_balance as mb
    from moe_balance import export
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.config.output_router_logits = False  # the LM loss alone (a run with moe_aux_loss_coef saves it True)
    mb.patch(model, bias_update="none", selftest=False)
    report = export.routing_report(model, batches)
    return report["loss"], sum(report["maxvio_L"]) / len(report["maxvio_L"])


@pytest.mark.slow
def test_llamafactory_train_with_moe_balance_ships_a_balanced_model(tmp_path):
    from moe_balance.export import text_batches
    _tiny_model_tokenizer_and_data(tmp_path)
    heldout = text_batches(tmp_path / "tiny")  # 8 x 8 x 128 tokens of stdlib files no run trained on
    before_loss, before = _served(tmp_path / "tiny", heldout)
    _, plain = _train(tmp_path, "plain", balance=False)
    proc, balanced = _train(tmp_path, "balanced", balance=True)

    logs = json.loads((balanced / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in logs if "loss" in h]
    assert len(train_logs) == STEPS // 5 and all("moe_balance/maxvio_global" in h for h in train_logs)
    assert train_logs[-1]["moe_balance/maxvio_global"] < train_logs[0]["moe_balance/maxvio_global"]
    (shipped,) = [h for h in logs if "moe_balance/export_topk_agreement" in h]  # the callback's on_train_end
    assert shipped["moe_balance/export_topk_agreement"] == 1.0  # saved weights route as trained
    plain_logs = json.loads((plain / "trainer_state.json").read_text())["log_history"]
    assert not any("moe_balance/maxvio_global" in h for h in plain_logs)

    # LlamaFactory's aux loss (moe_aux_loss_coef -> output_router_logits) is on without the callback, off with it
    assert json.loads((plain / "config.json").read_text())["output_router_logits"] is True
    assert json.loads((balanced / "config.json").read_text())["output_router_logits"] is False
    assert "aux loss is switched off (Qwen3MoeConfig.output_router_logits)" in proc.stderr

    plain_loss, plain_maxvio = _served(plain, heldout)
    loss, maxvio = _served(balanced, heldout)
    print(f"held-out, stock transformers: before {before_loss:.3f} / MaxVio {before:.3f}; "
          f"llamafactory-cli {plain_loss:.3f} / {plain_maxvio:.3f}; with moe-balance {loss:.3f} / {maxvio:.3f}")
    assert maxvio < 0.5 * plain_maxvio
    assert loss < before_loss and loss < plain_loss + 0.1
