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
# Multi-head latent attention (DeepSeek-V3 style) at tiny sizes, one expert group
_MLA = dict(num_key_value_heads=4, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)
_TINY_EXTRA: dict[str, dict] = {
    "qwen2_moe": dict(shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_next": dict(decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=32,
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    "deepseek_v2": dict(num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
                        q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy"),
    "deepseek_v3": dict(num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
                        q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1),
    "glm4_moe": dict(n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
    # explicit MLA sizes: transformers 5.6 and 5.24 derive different head widths from the defaults
    "glm4_moe_lite": dict(num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          kv_lora_rank=16, q_lora_rank=16),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=16, n_groups=1, chunk_size=16),
    "ergo": dict(num_dense_blocks=0, mlp_layer_types=["sparse", "sparse"], shared_intermediate_size=32,
                 first_dense_intermediate_size=64),
    "kolibri1_1": dict(head_dim=16, num_attention_heads=2, num_key_value_heads=1, index_num_heads=1,
                       mlp_only_layers=[], shared_expert_intermediate_size=32),
    "glm_moe_dsa": dict(num_key_value_heads=4, first_k_dense_replace=0, mlp_layer_types=["sparse", "sparse"],
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16,
                        index_head_dim=16, index_n_heads=2),
    "axk2": dict(num_key_value_heads=4),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False),
    "llama4_text": dict(interleave_moe_layer_step=1, intermediate_size_mlp=64, no_rope_layers=[1, 1]),
    "granitemoeshared": dict(shared_intermediate_size=32),
    "granitemoehybrid": dict(shared_intermediate_size=32, layer_types=["attention", "mamba"],
                             mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1),
    "minimax": dict(layer_types=["full_attention", "full_attention"], block_size=16),
    "longcat_flash": dict(num_key_value_heads=4, num_layers=1, ffn_hidden_size=64, expert_ffn_hidden_size=32,
                          zero_expert_num=0,
                          kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                          v_head_dim=8),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["full_attention", "full_attention"]),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_layer_start_index=0, moe_num_shared_experts=0),
    "hunyuan_v1_moe": dict(moe_topk=2, num_shared_expert=1),
    # linear-attention hybrids keep one full-attention layer: a cache of linear-attention layers alone
    # cannot tell its sequence length (transformers raises in get_seq_length)
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                             shared_expert_intermediate_size=32),
    "kimi_linear": dict(_MLA, mlp_layer_types=["sparse", "sparse"], layer_types=["linear_attention", "full_attention"],
                        linear_head_dim=8, linear_num_heads=2),
    "bailing_hybrid": dict(_MLA, mlp_layer_types=["sparse", "sparse"],
                           layer_types=["linear_attention", "full_attention"], linear_head_dim=8, linear_num_heads=2),
    # the sparse-attention indexer keeps index_topk keys per query: fewer than the test's 12 tokens
    "deepseek_v32": dict(_MLA, mlp_layer_types=["sparse", "sparse"], index_topk=4, index_head_dim=8, index_n_heads=2),
    "axk1": dict(_MLA, mlp_layer_types=["sparse", "sparse"]),
    # both make their first layers dense by default (beam 3, flint 2): a 2-layer model would have no router
    "beam": dict(num_key_value_heads=4, n_group=1, topk_group=1, mlp_layer_types=["sparse", "sparse"]),
    "flint": dict(mlp_only_layers=[]),
    "dots3_note_text": dict(_MLA, mlp_layer_types=["sparse", "sparse"], index_topk=4, index_head_dim=8,
                            index_n_heads=2, shared_experts_intermediate_size=32),
    # Qwen4-Exp: linear attention beside indexed (sparse) attention, hyper-connections of 2 streams
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention"], linear_num_value_heads=2,
                           linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                           shared_expert_intermediate_size=32, hc_count=2, hc_lowrank=8, indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2),
    # Gemma 4 names its top-k top_k_experts; hide the shared num_experts_per_tok so that is what is read
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, num_experts_per_tok=None,
                        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128),
}


# Multimodal model types: (model_type of their language model, smallest settings of their other
# towers). The text tower gets that model_type's tiny config; tiny_model builds the whole
# multimodal model (ForConditionalGeneration), which text-only batches run through.
_TINY_COMPOSITE: dict[str, tuple[str, dict]] = {
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
        temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16))),
    "qwen4_exp": ("qwen4_exp_text", dict(vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
        temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16))),
    "gemma4": ("gemma4_text", dict(audio_config=None, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, position_embedding_size=16, pooling_kernel_size=1))),
    "dots3_note": ("dots3_note_text", dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=4, moe_intermediate_size=32, spatial_merge_size=1, num_local_experts=8,
                           num_experts_per_tok=2, router_scaling_factor=1.0, adapter_in_dim=32, adapter_out_dim=32,
                           adapter_merge_size=1, mlp_layer_types=["sparse"]),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          downsample_hidden_size=16, adapter_input_size=32, adapter_out_dim=32, feature_size=16))),
    "llama4": ("llama4_text", dict(vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32))),
}


def tiny_config(model_type: str, experts: int = 8, top_k: int = 2, **overrides):
    """A tiny transformers config (2 layers, hidden 32, ``experts`` experts, top-``top_k``).

    Example:
        >>> tiny_config("mixtral", experts=16).num_local_experts
        16
    """
    from transformers import AutoConfig
    if model_type in _TINY_COMPOSITE:  # overrides go to the language model, where the routers are
        text_type, towers = _TINY_COMPOSITE[model_type]
        text = tiny_config(text_type, experts=experts, top_k=top_k, **overrides)
        return AutoConfig.for_model(model_type, text_config=text.to_dict(), **towers)
    sizes = dict(num_local_experts=experts, num_experts=experts, n_routed_experts=experts,
                 num_experts_per_tok=top_k)
    extra = dict(_TINY_EXTRA.get(model_type, {}))
    for name in ("moe_num_experts", "moe_k", "moe_topk", "top_k_experts"):
        if name in extra:
            extra[name] = experts if name == "moe_num_experts" else top_k
    kwargs = {**_TINY_COMMON, **sizes, **extra, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    if "moe_topk" not in kwargs and isinstance(getattr(config, "moe_topk", None), int):
        config.moe_topk = top_k  # transformers 4.57 LongCat reads moe_topk only (default 12)
    return config


def tiny_model(model_type: str, seed: int = 0, experts: int = 8, top_k: int = 2, **overrides):
    """A tiny causal LM built from :func:`tiny_config` with a fixed seed (multimodal types: the whole
    image-text-to-text model)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    torch.manual_seed(seed)
    config = tiny_config(model_type, experts=experts, top_k=top_k, **overrides)
    auto = AutoModelForImageTextToText if model_type in _TINY_COMPOSITE else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager")


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained here on ``texts`` (no download), with ``<pad>``, ``<s>``, ``</s>`` as
    ids 0, 1, 2: what framework tests (axolotl, LlamaFactory, ms-swift) save beside a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def stdlib_files() -> list:
    """The standard library's own ``.py`` sources (no ``test/``, no ``site-packages``), sorted."""
    import sysconfig
    from pathlib import Path
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def stdlib_corpus(max_bytes: int | None = None, split: str = "train", val_every: int = 10):
    """Byte-level corpus from stdlib sources: ``(uint8 tensor, sha256 of the file list)``.

    Files are split by position in the sorted list: every ``val_every``-th file is validation.
    """
    import hashlib
    files = stdlib_files()
    digest = hashlib.sha256("\n".join(str(p.name) + ":" + str(p.stat().st_size) for p in files).encode())
    chosen = [p for i, p in enumerate(files) if (i % val_every == 0) == (split == "val")]
    chunks, total = [], 0
    for path in chosen:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long(), digest.hexdigest()[:16]


def batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
    """Endless random windows ``[B, S]`` from a 1-D token tensor, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def skew_routers(model: torch.nn.Module, sample_ids: torch.Tensor, strength: float = 3.0) -> None:
    """Make every router prefer low-numbered experts: adds ``s_e`` (from +strength to -strength)
    to expert e's logit for a typical token, along the mean direction of the router inputs."""
    from .patching.api import find_routers
    from .patching.registry import router_owner
    modules = dict(model.named_modules())
    # the module holding the router weight (a 4.x sparse block: its linear gate), fed the block's input
    routers = [router_owner(modules[r["name"]], r["num_experts"]) for r in find_routers(model) if r["strategy"]]
    means: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_pre_hook(
        lambda m, args, i=i: means.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).float().mean(0)))
        for i, r in enumerate(routers)]
    try:
        with torch.random.fork_rng(devices=[]):
            model(input_ids=sample_ids)
    finally:
        for h in hooks:
            h.remove()
    for i, router in enumerate(routers):
        holder = next(m for m in (router, getattr(router, "wg", None), getattr(router, "layer", None))
                      if isinstance(getattr(m, "weight", None), torch.Tensor))
        weight = holder.weight
        direction = means[i] / means[i].pow(2).sum().clamp_min(1e-12)
        shift_E = torch.linspace(strength, -strength, weight.shape[0])
        weight += (shift_E[:, None] * direction[None, :]).to(weight.dtype)


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, balancer, data: torch.Tensor, n_batches: int = 12,
                     batch_size: int = 16, seq_len: int = 128, seed: int = 123) -> tuple[float, dict[str, float]]:
    """Mean LM loss and balance metrics over a fixed held-out sample; the bias is untouched."""
    windows, losses = batches(data, batch_size, seq_len, seed=seed), []
    with balancer.measuring():
        for _ in range(n_batches):
            ids = next(windows)
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses), balancer.metrics()


def eval_maxvio(model: torch.nn.Module, balancer, data: torch.Tensor, n_batches: int = 12,
                batch_size: int = 16, seq_len: int = 128) -> float:
    """MaxVio_global over a fixed held-out sample (thousands of tokens), bias untouched."""
    return evaluate_heldout(model, balancer, data, n_batches, batch_size, seq_len)[1]["maxvio_global"]


def train_skewed(model_type: str, steps: int, seed: int = 0, skew: float = 3.0, lr: float = 1e-3,
                 batch_size: int = 16, seq_len: int = 64, **balance: object) -> dict[str, float]:
    """Train a skewed tiny model on stdlib bytes with a plain loop; report balance and loss.

    Returns ``start_maxvio``/``end_maxvio`` (held-out) and ``first_loss``/``last_loss`` (mean of
    the first/last 20 training losses).
    """
    from .patching.api import patch
    train, _ = stdlib_corpus(max_bytes=2_000_000)
    val, _ = stdlib_corpus(max_bytes=400_000, split="val")
    model = tiny_model(model_type, seed=seed, vocab_size=256)
    skew_routers(model, next(batches(train, 8, 64, seed=9)), strength=skew)
    balancer = patch(model, **balance)
    start = eval_maxvio(model, balancer, val)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    stream, losses = batches(train, batch_size, seq_len, seed=seed), []
    for _ in range(steps):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss + balancer.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        losses.append(float(loss))
    return {"start_maxvio": start, "end_maxvio": eval_maxvio(model, balancer, val),
            "first_loss": sum(losses[:20]) / 20, "last_loss": sum(losses[-20:]) / 20}


class ByteWindows(torch.utils.data.Dataset):
    """Fixed, evenly spaced windows of a byte corpus as causal-LM examples."""

    def __init__(self, data: torch.Tensor, seq_len: int = 64, count: int = 256) -> None:
        stride = max(1, (data.numel() - seq_len - 1) // count)
        self.windows = [data[i * stride:i * stride + seq_len] for i in range(count)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
