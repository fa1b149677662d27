"""Check a recipe and its inputs before anything is computed or written.

Every problem becomes one EsmInputError line that says what to fix.
"""

import importlib.metadata
import math
import os
from dataclasses import dataclass
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from mergekit.architecture import get_architecture_info
from mergekit.architecture.conversion import can_convert_checkpoint_keys
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoTokenizer

from mergekit_esm.architecture import DecoderLayout
from mergekit_esm.calibration.proxy import MAX_PROXY_WINDOWS, SELF_PROXY, default_window_count, load_documents, token_windows
from mergekit_esm.errors import EsmInputError
from mergekit_esm.methods import METHODS, MergeSettings, MethodDefinition
from mergekit_esm.methods.base import Strength, unknown_parameter_message


_MERGEKIT_VERSION = importlib.metadata.version("mergekit")


@dataclass(frozen=True)
class MergeInputs:
    """A checked merge: which method, who, with which settings, on which proxy text."""

    method: MethodDefinition
    base: ModelReference
    experts: tuple[ModelReference, ...]
    settings: MergeSettings
    layout: DecoderLayout
    # the recipe's proxy choice per calibrated expert ('self', 'builtin' or a file), checked to
    # give enough tokens; prepare.proxy_windows turns it into token windows
    proxies: dict[ModelReference, str]
    ranks: dict[str, int | None]  # target tensor name → k
    device: str
    trust_remote_code: bool
    tokenizer: Any

    @property
    def models(self) -> tuple[ModelReference, ...]:
        return (self.base, *self.experts)


def _scalar(method: str, name: str, value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise EsmInputError(
        f"{method} parameter '{name}' {where} must be a single value, not {value!r} "
        "(per-layer gradients and filters do not apply to its settings)"
    )


def _settings(method: MethodDefinition, config: MergeConfiguration) -> tuple[MergeSettings, dict]:
    """The recipe's global settings and each model's per-model ones (only declared keys)."""
    settings_type = method.settings_type
    allowed = set(settings_type.model_fields)
    raw = {}
    for name, value in (config.parameters or {}).items():
        if name not in allowed:
            raise EsmInputError(unknown_parameter_message(name, f"for {method.name} in `parameters`", allowed))
        raw[name] = _scalar(method.name, name, value, "in `parameters`")
    try:
        settings = settings_type(**raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0])
        # pydantic reports a strength's first alternative only ("a valid number"), never 'auto'
        if settings_type.model_fields[field].annotation == Strength:
            raise EsmInputError(
                f"{method.name} parameter '{field}' takes a non-negative number or 'auto' "
                f"(got {first.get('input')!r})"
            ) from None
        raise EsmInputError(
            f"{method.name} parameter '{field}': {first['msg']} (got {first.get('input')!r})"
        ) from None
    per_model = {}
    for entry in config.models or []:
        where = f"for model {entry.model}"
        for name, value in (entry.parameters or {}).items():
            if name not in settings_type.PER_MODEL:
                raise EsmInputError(unknown_parameter_message(name, f"for {method.name} {where}", settings_type.PER_MODEL))
        per_model[entry.model] = {
            name: _scalar(method.name, name, (entry.parameters or {}).get(name, getattr(settings, name)), where)
            for name in settings_type.PER_MODEL
        }
    return settings, per_model


def _missing_folder_message(path: str) -> str:
    if os.path.exists(os.path.expanduser(path)):
        return f"model folder {path}: mergekit does not expand '~'; write it as {os.path.expanduser(path)}"
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    return f"model folder {path} does not exist{where}: check the path in the recipe"


def _in_hub_cache(source, hub_cache: str | None) -> bool:
    found = try_to_load_from_cache(source.path, "config.json", cache_dir=hub_cache, revision=source.revision)
    return isinstance(found, str)  # else None (never fetched) or a marker (known to be missing)


def _check_model_sources(models: tuple[ModelReference, ...], hub_cache: str | None) -> None:
    """Name a model that cannot be found before mergekit asks the Hub for it. mergekit takes
    every path that is not a folder for a Hub id: a mistyped folder gets the Hub's repo-id
    complaint, and an id it cannot download offline a connection error."""
    for model in models:
        for source in filter(None, (model.model, model.lora)):
            if os.path.exists(source.path):
                continue
            try:
                validate_repo_id(source.path)
            except HFValidationError:
                raise EsmInputError(_missing_folder_message(source.path)) from None
            if hub_constants.HF_HUB_OFFLINE and not _in_hub_cache(source, hub_cache):
                raise EsmInputError(
                    f"model {source} is neither a local folder nor in the Hugging Face cache, and "
                    "HF_HUB_OFFLINE=1 forbids downloading it: download it while online, or give the "
                    "path of a local copy"
                )


def _open_safetensors_index(model: ModelReference):
    try:
        index = LoaderCache().get(model).index
    except Exception as error:
        raise EsmInputError(f"cannot open model {model}: {error}") from None
    if not index.is_safetensors:
        raise EsmInputError(
            f"model {model} has only pickle (.bin) weights: mergekit-esm reads safetensors lazily; convert "
            "it by loading it with transformers and calling `model.save_pretrained(path)`"
        )
    return index


def _tensor_shapes(index) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for shard in index.shards:
        with safe_open(os.path.join(index.base_path, shard.filename), framework="pt") as f:
            for name in shard.contained_keys:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _check_same_weights(model, base, shapes, base_shapes):
    if shapes.keys() != base_shapes.keys():
        extra = sorted(shapes.keys() - base_shapes.keys())[:3]
        missing = sorted(base_shapes.keys() - shapes.keys())[:3]
        raise EsmInputError(
            f"model {model} has other tensors than the base {base} (extra: {extra}, missing: "
            f"{missing}); mergekit-esm merges experts fine-tuned from the same base architecture"
        )
    for name, shape in shapes.items():
        if shape != base_shapes[name]:
            raise EsmInputError(
                f"model {model} tensor {name} has shape {list(shape)} but the base has "
                f"{list(base_shapes[name])}; merges need experts with the base's shapes"
            )


def _check_mergekit_layout(config: MergeConfiguration, options: MergeOptions, base, base_config, base_shapes) -> None:
    """mergekit plans the merge from its own template of the architecture and stops at the
    first tensor the template requires that the checkpoint lacks, after the pre-pass has run
    (e.g. Command R without q/k norms, which mergekit 0.1.5's cohere template requires)."""
    try:
        weights = get_architecture_info(config, options).all_weights(base_config)
    except Exception as error:  # mergekit raises RuntimeError or ValueError with its reason
        raise EsmInputError(f"mergekit cannot plan this merge: {error}") from None
    stored = set(base_shapes)
    for weight in weights:
        names = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
        # mergekit reads a tensor transformers 5 keeps in another layout than the checkpoint
        # (stacked experts, stored per expert) through transformers' conversion mapping
        present = (can_convert_checkpoint_keys(base_config.model_type, stored, n) for n in names)
        if not weight.optional and not any(present):
            raise EsmInputError(
                f"mergekit's template for {base_config.architectures[0]} requires tensor {weight.name}, "
                f"which model {base} lacks: mergekit {_MERGEKIT_VERSION} cannot merge this checkpoint"
            )


def _tokenizer(model: ModelReference, base_path: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise EsmInputError(
            f"cannot load the tokenizer of {model} ({error}); it is needed to check the vocabularies and tokenize proxy text"
        ) from None


def _proxy_token_count(proxy: str, tokenizer, settings: MergeSettings) -> int:
    """How many tokens a proxy choice gives an expert, found without writing any: text the
    expert writes itself (proxy: self) is always proxy_samples × proxy_max_tokens long; a text
    source is read and tokenized, which also checks that it exists and holds text."""
    if proxy == SELF_PROXY:
        return settings.proxy_samples * settings.proxy_max_tokens
    windows = token_windows(load_documents(proxy), tokenizer, settings.proxy_samples, settings.proxy_max_tokens)
    return sum(len(w) for w in windows)


def _routed_share(layout: DecoderLayout) -> dict[str, float]:
    """Each expert MLP's expected share of the proxy tokens, top-k / E (target name → share)."""
    top_k = getattr(layout.config, "num_experts_per_tok", 1)
    return {
        t.name: min(1.0, top_k / len({s.expert for s in layout.targets_in[t.tensor]}))
        for t in layout.targets
        if t.expert is not None
    }


def preflight(config: MergeConfiguration, options: MergeOptions) -> MergeInputs:
    method = METHODS[config.merge_method]
    name = method.name
    if config.slices or config.modules:
        raise EsmInputError(f"{name} recipes use `models:` (whole models), not `slices:` or `modules:`")
    if config.base_model is None:
        raise EsmInputError(f"{name} needs `base_model:`, the model every expert was fine-tuned from")
    experts = tuple(dict.fromkeys(m.model for m in config.models or [] if m.model != config.base_model))
    if len(experts) < 2:
        raise EsmInputError(
            f"{name} merges at least 2 experts besides the base; the recipe lists {len(experts)}"
        )
    settings, per_model = _settings(method, config)

    base = config.base_model
    _check_model_sources((base, *experts), options.transformers_cache)
    LoaderCache().setup(options=options)
    trust = options.trust_remote_code
    indexes = {m: _open_safetensors_index(m) for m in (base, *experts)}
    base_config = base.config(trust_remote_code=trust)
    layout = DecoderLayout(base_config)
    layout.targets  # raises for architectures without the target linears
    if method.needs_input_gram and any(t.expert is not None for t in layout.targets):
        raise EsmInputError(
            f"{name} does not merge mixture-of-experts layers yet: an expert MLP that the proxy "
            "routes no token to has no input Gram to weigh its experts by; use esm, tsv, iso_c or iso_cts"
        )
    base_shapes = _tensor_shapes(indexes[base])
    for expert in experts:
        arch = expert.config(trust_remote_code=trust).architectures
        if arch != base_config.architectures:
            raise EsmInputError(
                f"model {expert} is a {arch} but the base is a {base_config.architectures}; "
                f"{name} merges experts of the base's architecture"
            )
        _check_same_weights(expert, base, _tensor_shapes(indexes[expert]), base_shapes)
    _check_mergekit_layout(config, options, base, base_config, base_shapes)

    tokenizer = _tokenizer(base, indexes[base].base_path, trust)
    for expert in experts:
        path = indexes[expert].base_path
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            if _tokenizer(expert, path, trust).get_vocab() != tokenizer.get_vocab():
                raise EsmInputError(
                    f"model {expert} has another vocabulary than the base {base}; mergekit-esm merges "
                    "experts that share the base's tokenizer"
                )

    ranks = {}
    for target in layout.targets:
        d_out, d_in = target.shape
        k = getattr(settings, "rank", None) or method.default_rank(settings, d_out, d_in, len(experts))
        if k is not None and k > min(d_out, d_in):
            raise EsmInputError(
                f"rank {k} exceeds what {target.name} ({d_out}×{d_in}) can hold "
                f"({min(d_out, d_in)}): lower `rank`"
            )
        ranks[target.name] = k
    proxies = {}
    if method.calibrates(settings):
        # RegMean has no rank: any token will do, its ridge covers the directions left unseen.
        # An expert MLP of a mixture-of-experts layer sees only the tokens routed to it (about
        # top-k / E of them): the default proxy aims at k of those, and one that gets fewer
        # takes the SVD basis (methods/esm.py) instead of stopping the merge.
        share = _routed_share(layout)
        ranked = {name: k for name, k in ranks.items() if k is not None}
        needed = max((k for name, k in ranked.items() if name not in share), default=1)
        if settings.proxy_samples is None:
            aimed = max((math.ceil(k / share.get(name, 1.0)) for name, k in ranked.items()), default=1)
            count = default_window_count(aimed, settings.proxy_max_tokens) if ranked else MAX_PROXY_WINDOWS
            settings = settings.model_copy(update={"proxy_samples": count})
        for expert in experts:
            proxy = proxies[expert] = per_model[expert]["proxy"]
            n = _proxy_token_count(proxy, tokenizer, settings)
            if n < needed:
                raise EsmInputError(
                    f"proxy '{proxy}' gives {n} tokens for {expert} but rank {needed} needs at "
                    f"least {needed} (the essential subspace has at most one direction per token): add "
                    "proxy text, raise proxy_samples / proxy_max_tokens, or lower `rank`"
                )
    return MergeInputs(
        method=method,
        base=base,
        experts=experts,
        settings=settings,
        layout=layout,
        proxies=proxies,
        ranks=ranks,
        device=str(options.device or "cpu"),
        trust_remote_code=trust,
        tokenizer=tokenizer,
    )

