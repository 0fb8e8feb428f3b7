"""Small synthetic routers for tests, benchmarks and docs (no model needed)."""

from __future__ import annotations

import torch


class SkewedRouter:
    """A fixed set of tokens whose softmax router prefers low-numbered experts.

    ``logits = base_TE + skew_E + noise`` where ``skew_E`` falls linearly from ``+skew`` to
    ``-skew``; the bias is added to the probabilities before top-k, as most routers do.

    Example:
        >>> r = SkewedRouter(num_tokens=64, num_experts=4, top_k=1)
        >>> logits_TE, idx_TK = r.route(torch.zeros(4))
        >>> idx_TK.shape
        torch.Size([64, 1])
    """

    def __init__(self, num_tokens: int = 4096, num_experts: int = 8, top_k: int = 2, skew: float = 2.0,
                 noise: float = 0.05, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.base_TE = torch.randn(num_tokens, num_experts, generator=gen) * 0.5
        self.skew_E = torch.linspace(skew, -skew, num_experts)
        self.noise, self.top_k, self.gen = noise, top_k, gen

    def route(self, bias_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = self.base_TE + self.skew_E + self.noise * torch.randn(self.base_TE.shape, generator=self.gen)
        probs_TE = torch.softmax(logits_TE, -1)
        idx_TK = torch.topk(probs_TE + bias_E, self.top_k, dim=-1).indices
        return logits_TE, idx_TK


# Small sizes every tiny config shares; per-model_type extras below (names differ by family).
_TINY_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    num_local_experts=8, num_experts=8, n_routed_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
_TINY_EXTRA: dict[str, dict] = {
    "qwen2_moe": dict(shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_next": dict(decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=32,
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    "deepseek_v2": dict(num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy"),
    "deepseek_v3": dict(num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1),
    "glm4_moe": dict(n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False),
    "llama4_text": dict(interleave_moe_layer_step=1, intermediate_size_mlp=64, no_rope_layers=[1, 1]),
    "granitemoeshared": dict(shared_intermediate_size=32),
    "granitemoehybrid": dict(shared_intermediate_size=32, layer_types=["attention", "mamba"],
                             mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1),
    "minimax": dict(layer_types=["full_attention", "full_attention"], block_size=16),
    "longcat_flash": dict(num_key_value_heads=4, num_layers=1, ffn_hidden_size=64, expert_ffn_hidden_size=32, zero_expert_num=0,
                          kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                          v_head_dim=8),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["full_attention", "full_attention"]),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_layer_start_index=0, moe_num_shared_experts=0),
    "hunyuan_v1_moe": dict(moe_topk=2, num_shared_expert=1),
}


def tiny_config(model_type: str, **overrides):
    """A tiny transformers config (2 layers, hidden 32, 8 experts, top-2) for ``model_type``.

    Example:
        >>> tiny_config("mixtral").num_local_experts
        8
    """
    from transformers import AutoConfig
    kwargs = {**_TINY_COMMON, **_TINY_EXTRA.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny causal LM built from :func:`tiny_config` with a fixed seed."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
