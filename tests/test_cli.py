"""``python -m moe_balance inspect`` describes the real architecture, not the tiny test config."""

from __future__ import annotations

from moe_balance.__main__ import main


def inspect_output(target: str, capsys) -> tuple[int, str]:
    code = main(["inspect", target])
    return code, capsys.readouterr().out


def test_inspect_model_type_uses_the_default_config(capsys):
    code, out = inspect_output("mixtral", capsys)
    assert code == 0
    assert "default mixtral config" in out and "meta device" in out
    assert "32 MoE layer(s) would be balanced" in out
    assert "model.layers.31.mlp.gate" in out


def test_inspect_real_longcat_counts_zero_experts(capsys):
    code, out = inspect_output("longcat_flash", capsys)  # 512 routed + 256 zero experts, top-12, softmax
    assert code == 0 and "28 MoE layer(s)" in out
    assert "    768    12  softmax  native_bias" in out


def test_inspect_falls_back_to_the_tiny_config_and_says_why(capsys):
    # dots1's default config has no experts (n_routed_experts=None): its MoE layers cannot be built
    code, out = inspect_output("dots1", capsys)
    assert code == 0
    assert "tiny test config of dots1" in out and "could not be built" in out
    assert "2 MoE layer(s) would be balanced" in out
