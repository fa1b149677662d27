"""Pure tensor functions of ESM (no I/O): subspaces, scaling levels and factor merging."""

from mergekit_esm.algebra.merge import (
    common_and_task_specific_merge,
    isotropic_merge,
    merge_task_factors,
    polar_orthogonalize,
    rank_above_rounding,
    storage_rounding_level,
    task_singular_vectors_merge,
    with_rounding_level,
)
from mergekit_esm.algebra.scaling import eigenvalue_flattening, layer_scales, polarized_scale
from mergekit_esm.algebra.subspace import TaskFactors, essential_subspace, svd_subspace

__all__ = [
    "TaskFactors",
    "common_and_task_specific_merge",
    "isotropic_merge",
    "task_singular_vectors_merge",
    "eigenvalue_flattening",
    "essential_subspace",
    "layer_scales",
    "merge_task_factors",
    "polar_orthogonalize",
    "polarized_scale",
    "rank_above_rounding",
    "storage_rounding_level",
    "svd_subspace",
    "with_rounding_level",
]
