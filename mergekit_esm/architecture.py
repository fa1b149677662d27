"""Which weights ESM targets in a decoder checkpoint and what feeds each of them.

mergekit's WeightInfo knows names but not module types or input wiring, so the layout is
read from the transformers model built on the meta device (no memory, no weights).
"""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from mergekit_esm.errors import EsmInputError

# Linear → the activation it reads. q/k/v share one input, gate/up share one input.
INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_hidden",
}


def _qkv_rows(config: PretrainedConfig, attention: nn.Module, linear: nn.Linear) -> list[tuple[str, int]]:
    """Phi-3's qkv_proj: its attention's forward slices the output as q (all heads), then k
    and v (the key-value heads), head_dim each."""
    kv = config.num_key_value_heads * attention.head_dim
    return [("q_proj", config.num_attention_heads * attention.head_dim), ("k_proj", kv), ("v_proj", kv)]


def _gate_up_rows(config: PretrainedConfig, mlp: nn.Module, linear: nn.Linear) -> list[tuple[str, int]]:
    """Phi-3's and GLM-4's gate_up_proj: their MLP's forward chunks the output in two halves,
    gate first."""
    return [("gate_proj", linear.out_features // 2), ("up_proj", linear.out_features // 2)]


# Fused linear → the target weights whose rows it stacks, in order, with their row counts
# (from the config and the owning module, as the owner's forward splits them). Each block is merged
# as its own target weight, with the fused linear's input, and the blocks are written back
# stacked.
FUSED_ROWS = {"qkv_proj": _qkv_rows, "gate_up_proj": _gate_up_rows}
# Fused layouts mergekit knows that are not split as above (InternLM2 interleaves q, k and v
# per key-value group).
UNSUPPORTED_FUSED = {"wqkv": "q, k and v interleaved per key-value group"}

# A mixture-of-experts layer's expert MLPs: module types of their own, so that layer-level
# scaling compares a layer's experts with other layers' experts, never with a dense MLP (or a
# shared expert) of the same layer.
EXPERT_TYPE = {"gate_proj": "experts.gate_proj", "up_proj": "experts.up_proj", "down_proj": "experts.down_proj"}


@dataclass(frozen=True)
class TargetWeight:
    name: str  # unique: the tensor's name (model.layers.3.mlp.up_proj.weight), or tensor:module_type for a block
    layer: int
    module_type: str  # q_proj … down_proj
    input_group: str  # attn_in, attn_out, mlp_in, mlp_hidden
    shape: tuple[int, int]  # (d_out, d_in) of this target (of its block, in a fused tensor)
    tensor: str  # the stored tensor that holds it
    rows: tuple[int, int] | None = None  # [start, end) of its block in a fused tensor
    expert: int | None = None  # its index in a stacked experts tensor (E × rows × d_in)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's part of its stored tensor: its expert's matrix of a stacked experts
        tensor, its rows of a fused one (all of it, unless either)."""
        matrix = tensor if self.expert is None else tensor[self.expert]
        return matrix if self.rows is None else matrix[self.rows[0] : self.rows[1]]


def stored_tensor(targets: list[TargetWeight], blocks: list[torch.Tensor]) -> torch.Tensor:
    """The stored tensor from its targets' blocks (`targets` as DecoderLayout.targets_in lists
    them, expert by expert, each expert's blocks in row order): the rows of a fused tensor
    stacked, the experts' matrices of a stacked experts tensor stacked along a new first axis."""
    if targets[0].expert is None:
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    by_expert: dict[int, list[torch.Tensor]] = {}
    for target, block in zip(targets, blocks):
        by_expert.setdefault(target.expert, []).append(block)
    return torch.stack([torch.cat(rows) for _, rows in sorted(by_expert.items())])


def is_stacked_experts(module: nn.Module) -> bool:
    """transformers 5's experts of a mixture-of-experts layer (MixtralExperts, Qwen3MoeExperts…):
    E expert MLPs held as stacked parameters, declared by `use_experts_implementation`."""
    return type(module).__name__.endswith("Experts") and hasattr(module, "is_concatenated")


def _is_gate_up_down_stack(module: nn.Module) -> bool:
    """Whether ESM can merge these stacked experts: gate_up_proj (E × [gate; up] × d_in, gate
    first) and down_proj (E × d_in × d_ff), without biases or norms, which the eager experts
    forward applies one expert at a time with F.linear."""
    return (
        {name for name, _ in module.named_parameters(recurse=False)} == {"gate_up_proj", "down_proj"}
        and module.has_gate
        and not module.has_bias
        and not module.is_transposed
        and module.is_concatenated
        and not getattr(module, "has_post_expert_norm", False)
    )


def _expert_targets(experts: nn.Module, prefix: str, index: int) -> list[TargetWeight]:
    """Each expert MLP's gate, up and down projections: E × 3 target weights. Each expert reads
    its own inputs (the tokens its router sends it), so its input groups are its own."""
    count, double_ff, d_in = experts.gate_up_proj.shape
    d_ff = double_ff // 2
    targets = []
    for expert in range(count):
        group = f"{prefix}.{expert}"
        for kind, span in (("gate_proj", (0, d_ff)), ("up_proj", (d_ff, double_ff))):
            tensor = f"{prefix}.gate_up_proj"
            targets.append(
                TargetWeight(
                    f"{tensor}:{expert}:{kind}", index, EXPERT_TYPE[kind], f"{group}:mlp_in", (d_ff, d_in), tensor, span, expert
                )
            )
        tensor = f"{prefix}.down_proj"
        targets.append(
            TargetWeight(
                f"{tensor}:{expert}", index, EXPERT_TYPE["down_proj"], f"{group}:mlp_hidden", (d_in, d_ff), tensor, None, expert
            )
        )
    # the stored tensors' order: all experts' gate_up_proj, then all experts' down_proj
    return sorted(targets, key=lambda t: t.tensor != f"{prefix}.gate_up_proj")


def _layer_targets(config: PretrainedConfig, layer: nn.Module, prefix: str, index: int) -> list[TargetWeight]:
    targets = []
    for name, module in layer.named_modules():
        if is_stacked_experts(module):
            targets += _expert_targets(module, f"{prefix}.{name}", index)
            continue
        kind = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or kind not in INPUT_OF.keys() | FUSED_ROWS.keys():
            continue
        tensor = f"{prefix}.{name}.weight"
        if kind in INPUT_OF:
            shape = (module.out_features, module.in_features)
            targets.append(TargetWeight(tensor, index, kind, INPUT_OF[kind], shape, tensor))
            continue
        blocks = FUSED_ROWS[kind](config, layer.get_submodule(name.rpartition(".")[0]), module)
        if sum(rows for _, rows in blocks) != module.out_features:
            raise EsmInputError(
                f"fused projection {tensor} has {module.out_features} rows, not the "
                f"{' + '.join(str(r) for _, r in blocks)} of its {', '.join(k for k, _ in blocks)}: "
                "mergekit-esm does not know how this architecture splits it"
            )
        start = 0
        for block, rows in blocks:
            shape = (rows, module.in_features)
            span = (start, start + rows)
            targets.append(TargetWeight(f"{tensor}:{block}", index, block, INPUT_OF[block], shape, tensor, span))
            start += rows
    return targets


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's module tree without memory, with the attention implementation transformers
    picks for it by default (SDPA where the architecture supports it; eager for Gemma 2, whose
    attention soft-capping SDPA cannot do), and the eager experts forward of a
    mixture-of-experts layer (transformers' reference loop, one F.linear per expert on the
    tokens routed to it, where calibration sees each expert's inputs)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def build_model_skeleton(config: PretrainedConfig, device: str | torch.device) -> nn.Module:
    """The model with its parameters on the meta device (each is loaded when its layer runs)
    and its non-persistent buffers (rotary frequencies, Gemma's embedding scale) computed on
    `device`. Buffers are filled by the model's own `_init_weights`, which is what
    transformers' from_pretrained runs for them: no architecture's formula is copied here."""
    model = build_meta_model(config)
    owners = {}
    for key, buffer in model.named_non_persistent_buffers():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[attr] = torch.empty_like(buffer, device=device)
        owners[owner] = module
    for module in owners.values():
        model._init_weights(module)
    return model


def _unsupported_layout(layers: nn.Module, layers_name: str) -> str | None:
    """A layout in the decoder layers that ESM cannot merge yet, named for the error message,
    or None. All layers are searched: Qwen-MoE-style models may keep dense MLPs in some."""
    for name, module in layers.named_modules(prefix=layers_name):
        kind = name.rsplit(".", 1)[-1]
        if kind in UNSUPPORTED_FUSED:
            return f"fused projection {name} ({UNSUPPORTED_FUSED[kind]})"
        if is_stacked_experts(module):
            if not _is_gate_up_down_stack(module):
                return (
                    f"mixture-of-experts layer {name} ({type(module).__name__}: stacked experts other than "
                    "gate_up_proj ([gate; up]) and down_proj without biases)"
                )
        elif kind == "experts" or type(module).__name__.endswith("Experts"):
            return f"mixture-of-experts layer {name} ({type(module).__name__}: not transformers' stacked experts)"
    return None


@dataclass(frozen=True)
class DecoderLayout:
    config: PretrainedConfig

    @cached_property
    def _meta(self) -> tuple[str, str, int, tuple[TargetWeight, ...], tuple[str, str]]:
        try:
            model = build_meta_model(self.config)
        except Exception as error:  # transformers raises many types for unknown configs
            raise EsmInputError(
                f"cannot build a causal LM from this config ({type(self.config).__name__}: "
                f"{error}); mergekit-esm supports decoders with q/k/v/o_proj and gate/up/down_proj linears "
                "(README: supported architectures)"
            ) from None
        layers_name = next(
            (
                name
                for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList)
                and len(module) == self.config.num_hidden_layers
            ),
            None,
        )
        embed = model.get_input_embeddings()
        parameters = dict(model.named_parameters())  # tied weights appear once, under the embedding
        embed_name = next(n for n, p in parameters.items() if p is embed.weight)
        head_name = next(n for n, p in parameters.items() if p is model.get_output_embeddings().weight)
        unsupported = _unsupported_layout(model.get_submodule(layers_name), layers_name) if layers_name else None
        if unsupported:
            raise EsmInputError(
                f"architecture {self.config.architectures} has a {unsupported}, which mergekit-esm "
                "does not merge yet: it supports q/k/v/o_proj and gate/up/down_proj linears, separate, fused as Phi-3's "
                "or stacked as transformers' experts of Mixtral and Qwen-MoE "
                "(README: supported architectures)"
            )
        targets = []
        for index, layer in enumerate(model.get_submodule(layers_name) if layers_name else ()):
            targets += _layer_targets(self.config, layer, f"{layers_name}.{index}", index)
        # a layer's MLP may be dense or a mixture of experts: either provides gate/up/down
        found = {t.module_type.removeprefix("experts.") for t in targets}
        if layers_name is None or found != set(INPUT_OF):
            missing = ", ".join(sorted(set(INPUT_OF) - found)) or "the decoder layer list"
            raise EsmInputError(
                f"architecture {self.config.architectures} lacks ESM's target linears "
                f"({missing}); mergekit-esm supports decoders with q/k/v/o_proj and gate/up/down_proj "
                "linears (README: supported architectures)"
            )
        norm_name = f"{layers_name.rsplit('.', 1)[0]}.norm"
        if f"{norm_name}.weight" not in parameters:
            raise EsmInputError(f"architecture {self.config.architectures} has no final norm at {norm_name}")
        return layers_name, embed_name, len(model.get_submodule(layers_name)), tuple(targets), (norm_name, head_name)

    @property
    def layers_name(self) -> str:
        return self._meta[0]

    @property
    def embed_name(self) -> str:
        return self._meta[1]

    @property
    def num_layers(self) -> int:
        return self._meta[2]

    @property
    def targets(self) -> tuple[TargetWeight, ...]:
        return self._meta[3]

    @property
    def head_names(self) -> tuple[str, str]:
        """(final norm module, output projection weight); the latter is embed_name when tied."""
        return self._meta[4]

    @cached_property
    def layer_of(self) -> dict[str, int]:
        return {t.name: t.layer for t in self.targets}

    @cached_property
    def targets_in(self) -> dict[str, list[TargetWeight]]:
        """Stored tensor name → the targets it holds, in row order (one, unless fused)."""
        held: dict[str, list[TargetWeight]] = {}
        for target in self.targets:
            held.setdefault(target.tensor, []).append(target)
        return held

    def layer_targets(self, layer: int) -> list[TargetWeight]:
        return [t for t in self.targets if t.layer == layer]
