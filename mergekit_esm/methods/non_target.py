"""The update of a tensor outside the target linears, shared by every method: norms, biases
and the vocabulary matrices (embed_tokens, lm_head) get W = W0 + α·update with the rule below.
"""

import torch

from mergekit_esm.methods.base import MergeSettings


def non_target_update(
    base: torch.Tensor, experts: list[torch.Tensor], vocabulary: bool, settings: MergeSettings
) -> torch.Tensor:
    """The mean of the task vectors ΔW_t = W_t − W0, the authors' rule for 1-D tensors;
    vocabulary matrices (`vocabulary`) too by default (`embedding_merge`), or their sum.

    The authors' TSV-M fallback for 2-D tensors would need an SVD per expert of a 128k-row
    vocabulary matrix, more than the rest of the merge costs, and the sum (what TSV-M
    approaches for disjoint row updates) measured no better than the mean
    (docs/zoo_studies.md).

    Float32, a new tensor the caller may overwrite. `base` and `experts` in any float dtype,
    read but never converted: a float32 copy of a vocabulary matrix is 2 GiB at Llama-3-8B's size.
    """
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for e in experts:  # summed in place, in float32 (in-place ops promote exactly)
        total.add_(e).sub_(base)
    return total if vocabulary and settings.embedding_merge == "sum" else total.div_(len(experts))
