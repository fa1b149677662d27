"""An independent, in-memory ESM written straight from ESM.md (whole models, float64, dense).

It shares no code with mergekit_esm: it runs each expert as a whole transformers model with
hooks to get X, and spells out every formula with plain torch.
"""

import torch
from transformers import AutoModelForCausalLM

from tests.reference_svd_family import blocks_of, polar

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "gate_up_proj")


def whiten(m):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh * s.mean()


def esm_weight(deltas, xs, k, gamma, p_task, p_dim, preserve_norm=False, whiten_factors=True):
    """ESM §1–2 for one weight: deltas[t] = ΔW_t, xs[t] = expert t's inputs to it (n × d_in).

    whiten_factors=False: TSV-M's combination of the factors instead of ESM's whitening,
    polar(P) · diag(σ) · polar(B), where A = diag(σ) B has unit rows.

    preserve_norm: after task and after dimension scaling A_cat is rescaled to the Frobenius norm
    it had before that scaling; unwhitened, flattening keeps each expert's ‖P diag(e²) A‖ = ‖A‖."""
    norms = [torch.linalg.matrix_norm(d) for d in deltas]
    mean_norm = sum(norms) / len(norms)
    ps, as_ = [], []
    for d, x, norm in zip(deltas, xs, norms):
        shift = x @ d.T
        lam, vec = torch.linalg.eigh(shift.T @ shift / (x.shape[0] - 1))
        lam, vec = lam.flip(0)[:k], vec.flip(1)[:, :k]
        e = (lam / lam.mean()) ** gamma
        coords = vec.T @ d
        if preserve_norm and not whiten_factors:  # P diag(e²) A keeps ‖A‖ (P has orthonormal columns)
            e = e * (torch.linalg.matrix_norm(coords) / torch.linalg.matrix_norm(coords * (e**2)[:, None])) ** 0.5
        else:
            e = e / e.mean()
        ps.append(vec * e)
        as_.append(coords * e[:, None])
    p, a = torch.cat(ps, 1), torch.cat(as_, 0)
    task_scales = torch.cat([torch.full((x.shape[0],), float((n / mean_norm) ** p_task)) for x, n in zip(as_, norms)])
    scaled = a * task_scales[:, None].double()
    if preserve_norm:
        scaled = scaled * torch.linalg.matrix_norm(a) / torch.linalg.matrix_norm(scaled)
    col = torch.linalg.vector_norm(scaled, dim=0)
    a = scaled * (col / col.mean()) ** p_dim
    if preserve_norm:
        a = a * torch.linalg.matrix_norm(scaled) / torch.linalg.matrix_norm(a)
    if whiten_factors:
        return whiten(p) @ whiten(a)
    sigma = torch.linalg.vector_norm(a, dim=1)
    return polar(p) @ torch.diag(sigma) @ polar(a / sigma[:, None])


def reference_settings(settings) -> dict:
    """esm_merge's keyword arguments for a settings object of the package (read, not imported)."""
    return dict(alpha=settings.alpha, gamma=settings.gamma, p_task=settings.task_exponent, p_dim=settings.dimension_exponent,
                p_layer=settings.layer_exponent, preserve_norm=settings.preserve_norm, whiten_factors=settings.whiten_factors)


def packed_windows(documents, tokenizer, samples, max_tokens):
    stream = []
    for doc in documents:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[: samples * max_tokens]
    return [stream[i : i + max_tokens] for i in range(0, len(stream), max_tokens)]


def capture_inputs(model, windows):
    seen = {}

    def hook(name):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            seen[name] = torch.cat([seen[name], x]) if name in seen else x

        return fn

    handles = [
        m.register_forward_pre_hook(hook(n + ".weight"))
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in TARGETS + FUSED
    ]
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in handles:
        h.remove()
    return seen


VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")  # the names in every architecture tested


def esm_merge(
    base_dir, expert_dirs, windows, alpha=1.0, gamma=0.15, p_task=2.0, p_dim=2.0, p_layer=2.0, embedding_merge="mean",
    preserve_norm=False, whiten_factors=True,
):
    base_model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = {k: v.double() for k, v in base_model.state_dict().items()}
    experts, inputs = [], []
    for d in expert_dirs:
        model = AutoModelForCausalLM.from_pretrained(d).eval()  # its whole forward, as transformers runs it
        experts.append({k: v.double() for k, v in model.state_dict().items()})
        inputs.append(capture_inputs(model, windows))
    T = len(experts)
    merged_delta, out = {}, {}  # merged_delta: (tensor, block kind) → ΔW of that block
    for name, w0 in base.items():
        deltas = [e[name] - w0 for e in experts]
        if name in inputs[0]:
            start = 0
            for kind, rows in blocks_of(name.split(".")[-2], base_model.config, w0.shape[0]):
                block = [d[start : start + rows] for d in deltas]
                start += rows
                k = max(1, rows // T)
                merged_delta[name, kind] = esm_weight(
                    block, [x[name] for x in inputs], k, gamma, p_task, p_dim, preserve_norm, whiten_factors
                )
        else:
            combine = torch.sum if name in VOCABULARY and embedding_merge == "sum" else torch.mean
            out[name] = w0 + alpha * combine(torch.stack(deltas), 0)
    betas = {}
    for kind in TARGETS:
        keys = [key for key in merged_delta if key[1] == kind]
        norms = {key: torch.linalg.matrix_norm(merged_delta[key]) for key in keys}
        mean = sum(norms.values()) / len(norms)
        scales = {key: (norms[key] / mean) ** p_layer for key in keys}
        if preserve_norm:  # Σ β²‖ΔW‖² = Σ ‖ΔW‖² over the layers of this module type
            ratio = (sum(v**2 for v in norms.values()) / sum((scales[key] * norms[key]) ** 2 for key in keys)) ** 0.5
            scales = {key: b * ratio for key, b in scales.items()}
        betas.update(scales)
    for name in {key[0] for key in merged_delta}:
        update = torch.cat([betas[key] * merged_delta[key] for key in merged_delta if key[0] == name])
        out[name] = base[name] + alpha * update
    return out
