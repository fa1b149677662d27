"""Tiny random decoder checkpoints on disk (safetensors + tokenizer), built in well under a second."""

from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from eval.byte_tokenizer import byte_tokenizer


def tiny_config(layers: int = 3, hidden: int = 32, intermediate: int = 64, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=258,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=256,
        eos_token_id=257,
    )


# Each architecture's detail that a layer-by-layer calibration could get wrong is switched on:
# sliding windows shorter than the test's 64-token proxy windows, local and global layers,
# embedding and residual multipliers, logit scaling.
_SHAPE = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=None)
_LOCAL_GLOBAL = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # q_norm / k_norm
    "gemma": ("GemmaConfig", {"head_dim": 8}),  # (1 + w) norms, √d embedding scale, tied embeddings
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 16}),  # + soft-capping, eager attention
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, **_LOCAL_GLOBAL}),  # + local/global rotary bases
    # parallel attention and MLP, logit scale; mergekit 0.1.5 requires the q/k norms (Command R+)
    "cohere": ("CohereConfig", {"use_qk_norm": True}),
    "cohere2": ("Cohere2Config", _LOCAL_GLOBAL),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.3, "logits_scaling": 2.0}),
    "olmo2": ("Olmo2Config", {}),  # norms after attention and MLP, q/k norms
    "stablelm": ("StableLmConfig", {}),  # LayerNorm with bias, partial rotary
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj
    "glm4": ("Glm4Config", {"head_dim": 8}),  # fused gate_up_proj, q/k/v biases, norms after attention and MLP
    # mixture of experts: 4 expert MLPs, 2 per token, stored per expert on disk and stacked in
    # memory; Qwen2-MoE adds a shared expert (dense gate/up/down) and its sigmoid gate
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": 16}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8}),
}
# Layouts that mergekit-esm refuses in preflight: GPT-OSS's experts interleave gate and up
# columns, are stored transposed and carry biases.
UNSUPPORTED = {
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}),
}


def architecture_config(name: str) -> PretrainedConfig:
    class_name, extra = {**ARCHITECTURES, **UNSUPPORTED}[name]
    return getattr(transformers, class_name)(**_SHAPE, **extra)


def write_model(path: Path, state: dict, config: PretrainedConfig, tokenizer=None) -> Path:
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return path


def write_zoo(root: Path, n_experts: int = 3, seed: int = 0, scale: float = 0.05, config=None, **config_kwargs):
    """A base and n experts (base + dense random updates of different size per expert), of
    `config`'s architecture or else tiny_config(**config_kwargs)'s Llama."""
    config = config or tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    base_state = AutoModelForCausalLM.from_config(config).state_dict()
    base = write_model(root / "base", base_state, config)
    experts = []
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(n_experts):
        state = {
            k: v + scale * (t + 1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base_state.items()
        }
        experts.append(write_model(root / f"expert{t}", state, config))
    return base, experts
