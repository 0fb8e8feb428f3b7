"""LoRA through PEFT: routers frozen (not LoRA targets), balanced by the online fold through the HF Trainer.

The fold needs no gradient: it edits the frozen base router weights after every step, so the merged model
(``merge_and_unload``, saved, loaded by stock transformers in a fresh process) routes as trained. An adapter
served on the *original* base does not carry the router edit (PEFT saves only the LoRA weights): measured
here and stated in docs/serving.md.
"""

from __future__ import annotations

import pytest
import torch

from moe_balance import export
from moe_balance.testing import ByteWindows, skew_routers, stdlib_corpus, tiny_model

from .test_export import _stock_eval

peft = pytest.importorskip("peft")


def test_lora_with_frozen_routers_merges_into_a_model_that_routes_as_trained(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from moe_balance.integrations.hf import MoEBalanceCallback

    train, _ = stdlib_corpus(max_bytes=300_000)
    base = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    skew_routers(base, train[:512].reshape(8, 64), strength=3.0)
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    routers = {n: p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert routers and not any(p.requires_grad for p in routers.values())  # frozen: not LoRA targets
    start = {n: p.detach().clone() for n, p in routers.items()}
    callback = MoEBalanceCallback(heatmap_every=0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=40, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=20, report_to=[], use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=ByteWindows(train, 64, 512), callbacks=[callback]).train()
    assert callback.balancer.metrics()["fold_fit"] > 0.05
    assert all(not torch.equal(p, start[n]) for n, p in routers.items())  # the fold moved the frozen routers
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    trained = export.routing_report(model, data)  # after the end fold: no bias applied
    trained_maxvio = sum(trained["maxvio_L"]) / len(trained["maxvio_L"])
    model.save_pretrained(tmp_path / "adapter")  # PEFT: the LoRA weights only (before merging removes them)
    merged = model.merge_and_unload()
    import moe_balance as mb
    mb.unpatch(merged)
    merged.save_pretrained(tmp_path / "merged")
    stock = _stock_eval(tmp_path / "merged", data, tmp_path)
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - trained_maxvio) < 1e-3 + 0.01 * trained_maxvio
    # the adapter alone on the original base: the LoRA weights travel, the router edit does not
    on_base = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                             tmp_path / "adapter").merge_and_unload()
    # the adapter's LoRA weights did arrive: its attention equals the merged model's, only the routers differ
    assert all(torch.equal(p, merged.get_parameter(n)) for n, p in on_base.named_parameters() if "q_proj" in n)
    on_base.save_pretrained(tmp_path / "on_base")
    adapter_only = _stock_eval(tmp_path / "on_base", data, tmp_path)
    print(f"served MaxVio: merged {stock['maxvio']:.3f}, adapter on the original base {adapter_only['maxvio']:.3f}")
    assert adapter_only["maxvio"] > stock["maxvio"] + 0.2  # what the docs warn about
