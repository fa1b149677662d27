"""Registration of each method in mergekit_esm.methods with mergekit: a spec generated from
its settings model, and one shared kernel.

The kernel itself is thin: all heavy work happened in the pre-pass (prepare.py), which the
run_merge wrapper activates for the duration of the merge.
"""

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from typing_extensions import Annotated

from mergekit_esm.errors import EsmInputError, ensure_finite
from mergekit_esm.methods import METHODS, MethodDefinition

if TYPE_CHECKING:  # prepare.py pulls in transformers; the registry import must stay light
    from mergekit_esm.integration.prepare import PreparedMerge

_active: dict[frozenset, "PreparedMerge"] = {}
_lock = threading.Lock()


@contextmanager
def activated(prepared: "PreparedMerge"):
    """Make a prepared merge visible to the kernel, keyed by its set of input models."""
    key = frozenset(prepared.inputs.models)
    with _lock:
        _active[key] = prepared
    try:
        yield
    finally:
        with _lock:
            _active.pop(key, None)


def subspace_kernel(group: TensorGroup, **_parameters) -> torch.Tensor:
    """W0 + α·update, the update as PreparedMerge.update defines it."""
    prepared = _active.get(frozenset(entry.id for entry in group.entries))
    if prepared is None:
        raise EsmInputError(
            "merge methods from mergekit-esm run through mergekit-yaml (or "
            "mergekit.merge.run_merge) with mergekit-esm installed; the pre-pass did not run "
            "for these models"
        )
    name = group.metadata.name
    base = group.base.tensor
    if not prepared.is_target(name):  # target inputs were checked when the pre-pass read them
        for entry in group.entries:
            ensure_finite(entry.tensor, name, entry.id)
    # in place on the update, in float32: one float32 copy of the tensor in all, not five
    merged = prepared.update(name, base, [e.tensor for e in group.non_base]).mul_(prepared.alpha).add_(base)
    # back to the dtype mergekit loaded the inputs in (the recipe's `dtype`), as its built-in
    # methods return: mergekit writes what the method returns (unless `out_dtype` is set), so
    # float32 would double the output's size and the writer's shard buffer
    return merged.to(base.dtype)


def _parameter_specs(method: MethodDefinition) -> tuple[ParameterSpec, ...]:
    settings_type = method.settings_type
    specs = []
    for name, field in settings_type.model_fields.items():
        value_type = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        specs.append(
            ParameterSpec(
                name=name,
                value_type=value_type,
                scope=ParameterScope.NON_BASE if name in settings_type.PER_MODEL else ParameterScope.SHARED,
                default=field.default,
                description=field.description,
            )
        )
    return tuple(specs)


def mergekit_method(method: MethodDefinition) -> FunctionalGroupMergeMethod:
    spec = MergeMethodSpec(
        name=method.name,
        pretty_name=method.pretty_name,
        reference_url=method.reference_url,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
        parameters=_parameter_specs(method),
    )
    return FunctionalGroupMergeMethod(spec, subspace_kernel)


def register_methods(registry) -> None:
    """Called with mergekit.merge_methods.registry once it is imported."""
    known = {m.spec.name for m in registry.registered_methods()}
    for method in METHODS.values():
        if method.name not in known:
            registry.register(mergekit_method(method))
