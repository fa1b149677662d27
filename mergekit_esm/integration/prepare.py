"""The pre-pass, run once per merge before mergekit's per-tensor executor starts.

mergekit runs one tensor at a time and a method cannot add graph dependencies, but ESM
needs (1) each expert's calibration statistics and (2) the norms of every layer's merged
update for layer-level scaling. So the pre-pass computes every target weight's ΔW_merged
one weight at a time and spills it to the cache (float32, one file per layer); the
kernel then only applies W0 + α·β·ΔW_merged. Spilling rather than computing twice keeps
memory at one weight of each model and makes a re-merge with another α or layer
exponent skip all linear algebra. TSV-M and Iso-C/CTS take the same path (no calibration,
β = 1), so a strength search costs them only the write as well.
"""

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import tqdm
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_esm.algebra import layer_scales, storage_rounding_level
from mergekit_esm.architecture import TargetWeight, stored_tensor
from mergekit_esm.cache import CacheEntry, cache_root, files_fingerprint, fingerprint
from mergekit_esm.calibration.layerwise import layer_input_moments
from mergekit_esm.calibration.proxy import SELF_PROXY, load_documents, token_windows
from mergekit_esm.calibration.self_proxy import self_generated_windows
from mergekit_esm.errors import EsmInputError
from mergekit_esm.integration.heap import map_large_allocations, trim_heap
from mergekit_esm.integration.preflight import MergeInputs
from mergekit_esm.methods.non_target import non_target_update
from mergekit_esm.strength.auto import BUDGET_WORDS, auto_alpha
from mergekit_esm.weights import checked_reader


def _layer_file(layer: int) -> str:
    return f"layer_{layer:05d}.safetensors"


def _model_fingerprint(model: ModelReference) -> list:
    index = LoaderCache().get(model).index
    files = sorted(set(index.tensor_paths.values())) + ["config.json"]
    return [str(model), files_fingerprint(index.base_path, files)]


def self_written_windows(
    inputs: MergeInputs, expert: ModelReference, root: Path, samples: int, max_tokens: int
) -> list[list[int]]:
    """The expert's own samples (proxy: self, alpha: auto), cached by model and options."""
    s = inputs.settings
    options = s.model_dump(include={"self_proxy_prompt", "self_proxy_temperature", "self_proxy_seed"})
    key = fingerprint("self-proxy", _model_fingerprint(expert), options, samples, max_tokens)
    entry = CacheEntry(root, "self-proxy", key)
    if not entry.complete:
        path = LoaderCache().get(expert).index.base_path
        start = time.perf_counter()
        windows = self_generated_windows(
            path,
            inputs.tokenizer,
            samples,
            max_tokens,
            s.self_proxy_temperature,
            s.self_proxy_prompt,
            s.self_proxy_seed,
            inputs.device,
            inputs.trust_remote_code,
        )
        seconds = time.perf_counter() - start
        print(f"ESM self-proxy: {expert} wrote {samples} × {max_tokens} tokens in {seconds:.0f} s", file=sys.stderr)
        with entry.writing() as scratch:
            (scratch / "windows.json").write_text(json.dumps(windows))
            # What generation cost, for the model card's reader and eval/compare_proxies.
            record = {
                "model": str(expert),
                "samples": samples,
                "max_tokens": max_tokens,
                "seconds": round(seconds, 1),
                "device": inputs.device,
            }
            (scratch / "generation.json").write_text(json.dumps(record))
    return json.loads((entry.path / "windows.json").read_text())


def proxy_windows(inputs: MergeInputs, expert: ModelReference, root: Path) -> list[list[int]]:
    """The token windows an expert is calibrated on, from the recipe's proxy choice for it:
    text the expert writes itself (proxy: self; sampled once, then cached) or a text source
    ('builtin' or a file), tokenized."""
    s = inputs.settings
    proxy = inputs.proxies[expert]
    if proxy == SELF_PROXY:
        return self_written_windows(inputs, expert, root, s.proxy_samples, s.proxy_max_tokens)
    return token_windows(load_documents(proxy), inputs.tokenizer, s.proxy_samples, s.proxy_max_tokens)


class TaskMatrices(Sequence):
    """ΔW_t = W_t − W0 of one target weight (its rows of a fused tensor) for every expert,
    read when accessed: methods that go through them in turn (ESM, TSV-M, Iso-C) hold one at
    a time, not T. Records which experts changed the weight and the dtype each was stored in."""

    def __init__(self, readers: dict[ModelReference, Callable], inputs: MergeInputs, target: TargetWeight, dtype: torch.dtype):
        self.target, self.dtype = target, dtype
        self.readers = [readers[e] for e in inputs.experts]
        self.base = target.of(readers[inputs.base](target.tensor)).to(dtype)
        self.changed: set[int] = set()
        self.stored: dict[int, torch.dtype] = {}

    @cached_property
    def base_rms(self) -> float:
        # only ESM asks (rounding_level): the other methods do not pay a pass over the base
        return float(self.base.square().mean().sqrt())

    def rounding_level(self, index: int) -> float:
        """Expert `index`'s ΔW rounding level as its checkpoint stores it (read it first)."""
        return storage_rounding_level(self.base_rms, tuple(self.base.shape), self.stored[index])

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        stored = self.target.of(self.readers[index](self.target.tensor))
        self.stored[index] = stored.dtype
        delta = stored.to(self.dtype) - self.base
        if delta.any():
            self.changed.add(index)
        return delta


def merge_layer(
    inputs: MergeInputs, layer: int, moments: dict[ModelReference, dict], zero: set, undersampled: set | None = None
):
    """ΔW_merged of each target weight of one layer (float32, on the CPU), from the experts'
    input statistics of this layer (`moments`, emptied as it goes). Experts found to change a
    weight leave `zero`; a ranked weight that some expert's proxy tokens cannot reveal k
    directions of (an expert MLP its router seldom chose) joins `undersampled`."""
    dtype = inputs.settings.compute_dtype(inputs.device)
    # Wide-output weights (gate/up_proj) need the largest workspace (T·k = d_ff columns to
    # orthogonalize): merge them last, when the other inputs' statistics have been dropped
    # after their last reader.
    targets = sorted(inputs.layout.layer_targets(layer), key=lambda t: t.shape[0] > t.shape[1])
    last_reader = {t.input_group: t.name for t in targets}
    # one reader per model for the layer: the expert MLPs of a stacked tensor share its conversion
    readers = {m: checked_reader(m, inputs.device) for m in inputs.models}
    merged = {}
    for target in targets:
        deltas = TaskMatrices(readers, inputs, target, dtype)
        statistics = [moments[e][target.input_group] for e in inputs.experts] if moments else None
        rank = inputs.ranks[target.name]
        if undersampled is not None and statistics and rank and not all(m.reveals_subspace(rank) for m in statistics):
            undersampled.add(target.name)
        update = inputs.method.merge_weight(inputs.settings, deltas, rank, statistics)
        merged[target.name] = update.to(torch.float32).cpu().contiguous()
        zero.difference_update(inputs.experts[i] for i in deltas.changed)
        del deltas, update, statistics
        if last_reader[target.input_group] == target.name:
            for by_group in moments.values():
                del by_group[target.input_group]
    return merged


def non_target(inputs: MergeInputs, name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """methods/non_target.py's update of a tensor outside the target linears."""
    layout = inputs.layout
    vocabulary = base.ndim == 2 and name in (layout.embed_name, layout.head_names[1])
    return non_target_update(base, experts, vocabulary, inputs.settings)


def merged_model_reader(inputs: MergeInputs, updates: Path):
    """A function name → tensor of the merged model at α = 1 as the pre-pass builds it
    (RegMean++): W0 + ΔW_merged for a target linear, from its layer's file in `updates`
    (readable once that layer is merged), W0 + the non-target update for the rest."""
    read_base = checked_reader(inputs.base, inputs.device)
    readers = [checked_reader(e, inputs.device) for e in inputs.experts]

    def read(name: str) -> torch.Tensor:
        base = read_base(name)
        targets = inputs.layout.targets_in.get(name)
        if targets is None:
            update = non_target(inputs, name, base, [r(name) for r in readers])
        else:  # a fused or stacked experts tensor's blocks are stacked as the tensor stacks them
            with safe_open(updates / _layer_file(targets[0].layer), framework="pt", device=str(base.device)) as f:
                update = stored_tensor(targets, [f.get_tensor(t.name) for t in targets])
        return update.add_(base)

    return read


def merged_updates(inputs: MergeInputs, root: Path) -> CacheEntry:
    """ΔW_merged of every target weight (before α and β), cached; plus their norms.

    Calibration runs in step with the merge: each expert's forward pass advances one layer,
    that layer's statistics are merged and dropped. So memory holds one layer's statistics per
    expert (never the whole model's) and nothing but the merged updates reaches the disk.
    """
    s = inputs.settings
    windows = {e: proxy_windows(inputs, e, root) for e in inputs.proxies}
    key = fingerprint(
        "deltas",
        inputs.method.name,
        _model_fingerprint(inputs.base),
        [(str(e), _model_fingerprint(e), windows.get(e)) for e in inputs.experts],
        s.model_dump(exclude=set(s.OUTSIDE_UPDATE_KEY)),
        str(s.compute_dtype(inputs.device)),
        inputs.ranks,
    )
    entry = CacheEntry(root, "deltas", key)
    if entry.complete:
        return entry
    map_large_allocations()
    method = inputs.method
    # ESM may hold down_proj's input as its shift moment, which needs the base's weights
    read_base = None if method.needs_input_gram else checked_reader(inputs.base, inputs.device)
    zero = set(inputs.experts)
    undersampled: set[str] = set()
    norms = {}
    work = "calibrating and merging" if windows else "merging"
    statistics = {}
    try:
        with entry.writing() as scratch:
            # RegMean++ carries each expert's hidden states through the layers merged so far
            read_merged = merged_model_reader(inputs, scratch) if method.calibrates_on_merged_layers else None
            statistics = {
                e: layer_input_moments(
                    checked_reader(e, inputs.device),
                    inputs.layout,
                    w,
                    inputs.device,
                    s.compute_dtype(inputs.device),
                    read_base,
                    read_merged,
                )
                for e, w in windows.items()
            }
            for layer in tqdm.trange(inputs.layout.num_layers, desc=f"{inputs.method.name} {work}", unit="layer"):
                moments = {e: next(layers).moments for e, layers in statistics.items()}
                merged = merge_layer(inputs, layer, moments, zero, undersampled)
                del moments
                norms.update({name: float(torch.linalg.matrix_norm(d)) for name, d in merged.items()})
                save_file(merged, scratch / _layer_file(layer))
                del merged
                trim_heap()
            if zero:
                raise EsmInputError(
                    f"model {sorted(map(str, zero))[0]} is identical to the base in every target weight "
                    "(zero task vector): leave it out of the recipe"
                )
            if undersampled:
                print(
                    f"{method.name}: {len(undersampled)} of {len(inputs.layout.targets)} target weights (expert MLPs "
                    "their routers seldom chose) got fewer proxy tokens than their rank from some model, whose "
                    "SVD basis they took (docs/design.md); more proxy text (proxy_samples) keeps them data-aware",
                    file=sys.stderr,
                )
            (scratch / "norms.json").write_text(json.dumps(norms))
    finally:
        for layers in statistics.values():
            layers.close()  # each expert's spilled hidden states go now, not at garbage collection
    return entry


@dataclass
class PreparedMerge:
    """What the kernel needs: where each ΔW_merged lies, its layer scale β, and α."""

    inputs: MergeInputs
    updates: Path
    betas: dict[str, float]  # target weight (TargetWeight.name) → β_ℓ
    alpha: float
    alpha_search: dict[float, float] | None = None  # alpha: auto — every α tried → its loss
    alpha_retention: tuple[float, float] | None = None  # alpha: auto — (chosen α's cost, budget), nats/token

    def target_update(self, name: str, device: torch.device | str) -> torch.Tensor:
        layer = self.inputs.layout.layer_of[name]
        with safe_open(self.updates / _layer_file(layer), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    def is_target(self, name: str) -> bool:
        """Whether a stored tensor holds target weights (its update is cached)."""
        return name in self.inputs.layout.targets_in

    def update(self, name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        """This tensor's update before α (W = W0 + α·update), float32, a new tensor the caller
        may overwrite. `base` and `experts` in any float dtype, read but never converted.

        Target linears: β_ℓ·ΔW_merged (cached; `experts` is not read), each block of a fused
        tensor and each expert MLP of a stacked experts tensor with its own β, stacked as the
        tensor stacks them. Other tensors (a mixture-of-experts router too):
        methods/non_target.py's rule.
        """
        if self.is_target(name):
            targets = self.inputs.layout.targets_in[name]
            return stored_tensor(targets, [self.target_update(t.name, base.device).mul_(self.betas[t.name]) for t in targets])
        return non_target(self.inputs, name, base, experts)


def prepare(inputs: MergeInputs) -> PreparedMerge:
    root = cache_root(inputs.settings.cache_dir)
    updates = merged_updates(inputs, root)
    norms = json.loads((updates.path / "norms.json").read_text())
    # A layer's norm per module type: of its one weight of that type, or of all its expert
    # MLPs' weights of that type together (‖·‖_F of the stacked tensor): a layer's mixture of
    # experts is compared with other layers' mixtures as a whole, since expert e of one layer
    # has no counterpart in another.
    squares: dict[str, dict[int, float]] = {}
    for target in inputs.layout.targets:
        by_layer = squares.setdefault(target.module_type, {})
        by_layer[target.layer] = by_layer.get(target.layer, 0.0) + norms[target.name] ** 2
    by_type = {kind: {layer: square**0.5 for layer, square in by_layer.items()} for kind, by_layer in squares.items()}
    betas = layer_scales(by_type, inputs.settings.layer_exponent_or_off, inputs.settings.scaling_preserves_norm)
    s = inputs.settings
    prepared = PreparedMerge(
        inputs=inputs,
        updates=updates.path,
        betas={t.name: betas[(t.module_type, t.layer)] for t in inputs.layout.targets},
        alpha=s.alpha if s.alpha != "auto" else float("nan"),
    )
    if s.alpha == "auto":
        windows = {
            e: self_written_windows(inputs, e, root, s.auto_alpha_samples, s.auto_alpha_max_tokens)
            for e in inputs.experts
        }
        base_windows = self_written_windows(inputs, inputs.base, root, s.auto_alpha_samples, s.auto_alpha_max_tokens)
        prepared.alpha, prepared.alpha_search, (costs, budget) = auto_alpha(
            prepared, windows, base_windows=base_windows, budget_rule=s.auto_alpha_budget
        )
        prepared.alpha_retention = (costs[prepared.alpha], budget)
        print(
            f"{inputs.method.name} alpha: auto chose α = {prepared.alpha:.4g} (cost to the base's own text "
            f"{costs[prepared.alpha]:+.3f} nats/token; budget, {BUDGET_WORDS[s.auto_alpha_budget]}: {budget:+.3f})",
            file=sys.stderr,
        )
    return prepared
