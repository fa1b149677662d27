"""ESM's recipe parameters (under `parameters:` in a mergekit YAML): names, defaults, checks.

This model is the single source of truth: the mergekit method spec is generated from it
and the preflight rejects any key it does not declare (mergekit itself ignores unknown keys).
"""

import difflib
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_PROXY = "builtin"


class EsmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        3.0,
        ge=0,
        description="Global strength α: W = W0 + α·β_ℓ·ΔW_merged. α=1 is the merged update as "
        "ESM builds it, without the authors' ViT factor 2 (α=1 here is their α=0.5). Default 3: "
        "best on the validation split of our expert zoo (see README).",
    )
    rank: Optional[int] = Field(
        None, ge=1, description="Directions kept per expert and weight; default ⌊d_out / T⌋."
    )
    gamma: float = Field(0.15, ge=0, description="Eigenvalue flattening exponent γ; 0 turns it off.")
    task_exponent: float = Field(2.0, description="Task-level polarized scaling exponent; 0 = off.")
    dimension_exponent: float = Field(
        2.0, description="Input-dimension-level polarized scaling exponent; 0 = off."
    )
    layer_exponent: float = Field(2.0, description="Layer-level polarized scaling exponent; 0 = off.")
    basis: Literal["esd", "svd"] = Field(
        "esd",
        description="esd: essential subspace from proxy activations (ESM); svd: singular "
        "vectors of ΔW merged the TSV-M way (the paper's SVD ablation rows).",
    )
    embedding_merge: Literal["mean", "sum"] = Field(
        "mean",
        description="Vocabulary matrices (embed_tokens, lm_head): mean or sum of the task "
        "vectors, times α (mean measured as good or better on the zoo; see README).",
    )
    proxy: str = Field(
        BUILTIN_PROXY,
        description="Calibration text: 'builtin' (generic text shipped with the package) or a "
        "path to a .txt (documents separated by blank lines) or .jsonl file ({\"text\": ...} per "
        "line). May be set per model.",
    )
    proxy_samples: int = Field(32, ge=1, description="Proxy windows per expert (paper: 32).")
    proxy_max_tokens: int = Field(512, ge=2, description="Tokens per proxy window.")
    cache_dir: Optional[str] = Field(
        None,
        description="Where calibration statistics and merged updates are cached; default "
        "$MERGEKIT_ESM_CACHE or ~/.cache/mergekit-esm.",
    )


PER_MODEL_PARAMETERS = frozenset({"proxy"})


def unknown_parameter_message(name: str, where: str, allowed: frozenset[str] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(allowed))}"
    return f"unknown ESM parameter '{name}' {where}: {hint}"
