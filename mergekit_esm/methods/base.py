"""What every method of the subspace family shares: common recipe parameters and the shape
of a method definition (its settings model and one pure per-weight function).

The settings models are the single source of truth for recipe parameters: the mergekit
method spec is generated from them and the preflight rejects any key they do not declare
(mergekit itself ignores unknown keys).
"""

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergekit_esm.calibration.proxy import (
    BUILTIN_PROXY,
    MAX_PROXY_WINDOWS,
    MIN_PROXY_WINDOWS,
    TOKENS_PER_DIRECTION,
    PromptMode,
)
from mergekit_esm.strength.auto import RetentionBudget


# A global strength: a non-negative number, or "auto" (strength/auto.py chooses it).
Strength = Union[Annotated[float, Field(ge=0)], Literal["auto"]]


class MergeSettings(BaseModel):
    """Parameters of every method: W = W0 + α·β_ℓ·ΔW_merged (β_ℓ = 1 without layer scaling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: Strength = Field(
        1.0, description="Global strength α: W = W0 + α·ΔW_merged; 'auto' chooses it without labels."
    )
    embedding_merge: Literal["mean", "sum"] = Field(
        "mean",
        description="Vocabulary matrices (embed_tokens, lm_head): mean or sum of the task "
        "vectors, times α (mean measured as good or better than sum; docs/zoo_studies.md).",
    )
    auto_alpha_samples: int = Field(
        8, ge=1, description="alpha: auto — samples each expert writes to judge the merge by."
    )
    auto_alpha_max_tokens: int = Field(128, ge=2, description="alpha: auto — tokens per sample.")
    auto_alpha_budget: RetentionBudget = Field(
        "least",
        description="alpha: auto — how much the merge may cost the base's own text: no more than "
        "the expert that cost it least ('least') or than the experts on average ('mean', which "
        "lets experts that forgot much of the base spend it for the others).",
    )
    self_proxy_prompt: PromptMode = Field(
        "generic",
        description="Expert-written text (proxy: self, alpha: auto): start each sample from a few "
        "short generic requests (through the chat template when the tokenizer has one) or from "
        "BOS alone ('bos').",
    )
    self_proxy_temperature: float = Field(1.0, gt=0, description="Expert-written text: sampling temperature.")
    self_proxy_seed: int = Field(0, description="Expert-written text: sampling seed (same seed, same text).")
    precision: Literal["auto", "float64", "float32"] = Field(
        "auto",
        description="Working precision of the per-weight linear algebra. auto: float32 on a GPU "
        "(consumer GPUs run float64 far slower) and for esm on CPU (faster, and it scored as "
        "float64 on our zoos); float64 on CPU for the other methods, whose float32 route was "
        "not measured against it. See docs/performance.md.",
    )
    cache_dir: Optional[str] = Field(
        None,
        description="Where expert-written samples and merged updates are cached; default "
        "$MERGEKIT_ESM_CACHE or ~/.cache/mergekit-esm.",
    )

    # Parameters that may also be set per model (the rest are global only).
    PER_MODEL: ClassVar[frozenset[str]] = frozenset()
    # Parameters that are not part of the merged updates' cache key: used only when the cached
    # ΔW_merged is applied, or already in the key as the proxy tokens they produce.
    OUTSIDE_UPDATE_KEY: ClassVar[frozenset[str]] = frozenset(
        {
            "alpha",
            "embedding_merge",
            "cache_dir",
            "auto_alpha_samples",
            "auto_alpha_max_tokens",
            "auto_alpha_budget",
            "self_proxy_prompt",
            "self_proxy_temperature",
            "self_proxy_seed",
        }
    )

    @property
    def layer_exponent_or_off(self) -> float:
        return getattr(self, "layer_exponent", 0.0)

    @property
    def scaling_preserves_norm(self) -> bool:
        return getattr(self, "preserve_norm", False)

    # what `precision: auto` means on a CPU (a GPU always takes float32)
    CPU_PRECISION: ClassVar[torch.dtype] = torch.float64

    def compute_dtype(self, device: str) -> torch.dtype:
        if self.precision == "auto":
            return self.CPU_PRECISION if torch.device(device).type == "cpu" else torch.float32
        return getattr(torch, self.precision)


class CalibratedSettings(MergeSettings):
    """Parameters of the methods that read proxy activations (ESM, RegMean, RegMean++)."""

    proxy: str = Field(
        BUILTIN_PROXY,
        description="Calibration text: 'builtin' (generic text shipped with the package), "
        "'self' (each expert samples its own text), or a path to a .txt (documents separated by "
        "blank lines) or .jsonl file ({\"text\": ...} or chat {\"messages\": [...]} per line). "
        "May be set per model.",
    )
    proxy_samples: Optional[int] = Field(
        None,
        ge=1,
        description="Proxy windows per expert. Default: for a method that keeps a rank k, enough "
        f"tokens for {TOKENS_PER_DIRECTION} per direction of the largest k, in "
        f"{MIN_PROXY_WINDOWS} to {MAX_PROXY_WINDOWS} windows (the ESM paper's 32); "
        f"{MAX_PROXY_WINDOWS} for the others.",
    )
    proxy_max_tokens: int = Field(512, ge=2, description="Tokens per proxy window.")

    PER_MODEL: ClassVar[frozenset[str]] = frozenset({"proxy"})
    # The proxy reaches ΔW_merged's cache key as the token windows it produces.
    OUTSIDE_UPDATE_KEY: ClassVar[frozenset[str]] = MergeSettings.OUTSIDE_UPDATE_KEY | {
        "proxy",
        "proxy_samples",
        "proxy_max_tokens",
    }


# ΔW_merged of one target weight from the experts' task matrices ΔW_t (float32, d_out × d_in),
# the rank k from `default_rank` (or the recipe) and, for methods that calibrate, each
# expert's input statistics for this weight.
WeightMerge = Callable[[MergeSettings, Sequence[torch.Tensor], Optional[int], Optional[Sequence]], torch.Tensor]


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    pretty_name: str
    reference_url: str
    formula: str  # one line for the model card and README
    settings_type: type[MergeSettings]
    merge_weight: WeightMerge
    default_rank: Callable[[MergeSettings, int, int, int], Optional[int]]  # (settings, d_out, d_in, experts) → k
    calibrates: Callable[[MergeSettings], bool] = lambda settings: False
    # The method reads each input's XᵀX itself (RegMean), so an input that one weight alone
    # reads cannot be held as that weight's shift moment ΔW XᵀX ΔWᵀ (ESM's smaller form).
    needs_input_gram: bool = False
    # RegMean++: each expert's hidden states reach layer ℓ through the merged layers 0…ℓ−1
    # (and the merged embedding) instead of the expert's own.
    calibrates_on_merged_layers: bool = False


def shorter_side_rank(d_out: int, d_in: int, experts: int) -> int:
    """TSV-M's budget: each of the T experts keeps 1/T of the shorter side, so together they
    keep no more directions than one ΔW can have."""
    return max(1, min(d_out, d_in) // experts)


def unknown_parameter_message(name: str, where: str, allowed: frozenset[str] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(allowed))}"
    return f"unknown parameter '{name}' {where}: {hint}"
