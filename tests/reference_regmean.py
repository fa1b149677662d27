"""RegMean and RegMean++ written straight from their papers: whole models in memory, float64,
dense solves of the normal equations on the full weights (not task vectors).

Shares no code with mergekit_esm: inputs are captured by hooks on whole transformers models
(tests/reference_esm.capture_inputs); RegMean++'s merged prefix is a whole model whose
embedding and layers below ℓ are replaced by the merged ones.
"""

import copy

import torch
from transformers import LlamaForCausalLM

from tests.reference_esm import capture_inputs


def _load(folder):
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def _state(model):
    return {k: v.double() for k, v in model.state_dict().items()}


def regmean_weight(weights, xs, ratio):
    """W_M = [(Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ]ᵀ, G_t = X_tᵀX_t / n_t, off-diagonal of G_t × ratio."""
    grams = []
    for x in xs:
        gram = x.T @ x / x.shape[0]
        grams.append(ratio * gram + (1 - ratio) * torch.diag(torch.diag(gram)))
    return torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T


def _with_alpha(base, merged, alpha):
    return {name: w0 + alpha * (merged[name] - w0) for name, w0 in base.items()}


def regmean_merge(base_dir, expert_dirs, windows, ratio, alpha=1.0):
    """RegMean on every target linear (each expert's inputs from its own model), every other
    tensor averaged; then W0 + α·(W − W0)."""
    base = _state(_load(base_dir))
    models = [_load(d) for d in expert_dirs]
    states = [_state(m) for m in models]
    inputs = [capture_inputs(m, windows) for m in models]
    merged = {name: torch.stack([s[name] for s in states]).mean(0) for name in base}
    for name in inputs[0]:
        merged[name] = regmean_weight([s[name] for s in states], [x[name] for x in inputs], ratio)
    return _with_alpha(base, merged, alpha)


def _below(name, layer):
    """Whether a tensor belongs to the merged prefix that feeds layer `layer`."""
    if name == "model.embed_tokens.weight":
        return True
    parts = name.split(".")
    return parts[:2] == ["model", "layers"] and int(parts[2]) < layer


def regmean_plus_plus_merge(base_dir, expert_dirs, windows, ratio, alpha=1.0):
    """RegMean++: layer ℓ's inputs for expert t come from expert t's model whose embedding and
    layers 0…ℓ−1 are the merged ones (non-linear tensors averaged, linears RegMean'd)."""
    base = _state(_load(base_dir))
    models = [_load(d) for d in expert_dirs]
    states = [_state(m) for m in models]
    merged = {name: torch.stack([s[name] for s in states]).mean(0) for name in base}
    for layer in range(models[0].config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        inputs = []
        for model in models:
            hybrid = copy.deepcopy(model)
            hybrid.load_state_dict({k: v.float() for k, v in merged.items() if _below(k, layer)}, strict=False)
            inputs.append({k: x for k, x in capture_inputs(hybrid, windows).items() if k.startswith(prefix)})
        for name in inputs[0]:
            merged[name] = regmean_weight([s[name] for s in states], [x[name] for x in inputs], ratio)
    return _with_alpha(base, merged, alpha)
