"""Tiny random LLaMA checkpoints on disk (safetensors + tokenizer), built in well under a second."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def write_model(path: Path, state: dict, config: LlamaConfig, tokenizer=None) -> Path:
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return path


def write_zoo(root: Path, n_experts: int = 3, seed: int = 0, scale: float = 0.05, **config_kwargs):
    """A base and n experts (base + dense random updates of different size per expert)."""
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    base_state = LlamaForCausalLM(config).state_dict()
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
