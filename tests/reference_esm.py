"""An independent, in-memory ESM written straight from ESM.md (whole models, float64, dense).

It shares no code with mergekit_esm: it runs each expert as a whole transformers model with
hooks to get X, and spells out every formula with plain torch.
"""

import torch
from transformers import AutoModelForCausalLM

from tests.reference_svd_family import blocks_of, polar

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "gate_up_proj")


def whiten(m, unflattened=None):
    """U Vᵀ times m's mean singular value; with `unflattened` (preserve_norm), times the mean
    singular value of m before eigenvalue flattening, measured along U Vᵀ: tr((U Vᵀ)ᵀ m₀)/r."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    q = u @ vh
    return q * (s.mean() if unflattened is None else (q * unflattened).sum() / s.numel())


def esm_weight(deltas, xs, k, gamma, p_task, p_dim, preserve_norm=False, whiten_factors=True, expert_rank="budget"):
    """ESM §1–2 for one weight: deltas[t] = ΔW_t, xs[t] = expert t's inputs to it (n × d_in).

    expert_rank: 'budget', the paper's k directions per expert; 'aligned', of those the leading
    j that maximize Σ_{i≤j}‖a_i‖/√j (tried for every j); 'auto', whitened, aligned times 1/3
    where every expert's k directions each carry a share of ΔW above 1e-9‖ΔW‖ (the package's
    floor is lower; the test experts are full rank or exactly low rank), else the budget.

    whiten_factors=False: TSV-M's combination of the factors instead of ESM's whitening,
    polar(P) · diag(σ) · polar(B), where A = diag(σ) B has unit rows, each expert's factors
    first written in singular form.

    preserve_norm: after task and after dimension scaling, A_cat is rescaled to the Frobenius
    norm it had before that scaling; whitened, each factor takes the size it has without
    eigenvalue flattening."""
    norms = [torch.linalg.matrix_norm(d) for d in deltas]
    mean_norm = sum(norms) / len(norms)
    subspaces = []
    for d, x in zip(deltas, xs):
        shift = x @ d.T
        lam, vec = torch.linalg.eigh(shift.T @ shift / (x.shape[0] - 1))
        subspaces.append((lam.flip(0)[:k], vec.flip(1)[:, :k]))
    shares = [torch.linalg.vector_norm(vec.T @ d, dim=1) for d, (_, vec) in zip(deltas, subspaces)]
    full = all(bool((s > 1e-9 * n).all()) for s, n in zip(shares, norms))
    aligned = expert_rank == "aligned" or (expert_rank == "auto" and whiten_factors and full)
    strength = 1 / 3 if aligned and expert_rank == "auto" else 1.0
    ps, as_, es = [], [], []
    for d, (lam, vec), share, norm in zip(deltas, subspaces, shares, norms):
        if aligned:
            j = max(range(1, k + 1), key=lambda j: float(share[:j].sum()) / j**0.5)
            lam, vec = lam[:j], vec[:, :j]
        e = (lam / lam.mean()) ** gamma
        coords = vec.T @ d
        if preserve_norm and not whiten_factors:  # P diag(e²) A keeps ‖A‖ (P has orthonormal columns)
            e = e * (torch.linalg.matrix_norm(coords) / torch.linalg.matrix_norm(coords * (e**2)[:, None])) ** 0.5
        else:
            e = e / e.mean()
        ps.append(vec * e)
        as_.append(coords * e[:, None])
        es.append(e)
    p, a = torch.cat(ps, 1), torch.cat(as_, 0)
    task_scales = torch.cat([torch.full((x.shape[0],), float((n / mean_norm) ** p_task)) for x, n in zip(as_, norms)])
    scaled = a * task_scales[:, None].double()
    if preserve_norm:
        scaled = scaled * torch.linalg.matrix_norm(a) / torch.linalg.matrix_norm(scaled)
    col = torch.linalg.vector_norm(scaled, dim=0)
    a = scaled * (col / col.mean()) ** p_dim
    if preserve_norm:
        a = a * torch.linalg.matrix_norm(scaled) / torch.linalg.matrix_norm(a)
    if whiten_factors and preserve_norm:
        e = torch.cat(es)
        return strength * whiten(p, p / e) @ whiten(a, a / e[:, None])
    if whiten_factors:
        return strength * whiten(p) @ whiten(a)
    # each expert's factors in singular form, P_t U and Σ Vᵀ for A_t = U Σ Vᵀ (the same product)
    bounds = torch.tensor([0] + [e.numel() for e in es]).cumsum(0).tolist()
    blocks = [(p[:, i:j], a[i:j]) for i, j in zip(bounds, bounds[1:])]
    svds = [torch.linalg.svd(a_t, full_matrices=False) for _, a_t in blocks]
    p = torch.cat([p_t @ u for (p_t, _), (u, _, _) in zip(blocks, svds)], 1)
    sigma, b = torch.cat([s_t for _, s_t, _ in svds]), torch.cat([vh for _, _, vh in svds], 0)
    return polar(p) @ torch.diag(sigma) @ polar(b)


def reference_settings(settings) -> dict:
    """esm_merge's keyword arguments for a settings object of the package (read, not imported)."""
    return dict(alpha=settings.alpha, gamma=settings.gamma, p_task=settings.task_exponent, p_dim=settings.dimension_exponent,
                p_layer=settings.layer_exponent, preserve_norm=settings.preserve_norm, whiten_factors=settings.whiten_factors,
                rank_rule=settings.rank_rule, expert_rank=settings.expert_rank)


def packed_windows(documents, tokenizer, samples, max_tokens):
    stream = []
    for doc in documents:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[: samples * max_tokens]
    return [stream[i : i + max_tokens] for i in range(0, len(stream), max_tokens)]


def capture_inputs(model, windows):
    """Each target's inputs in the model's own forward: a linear's input, and for each expert
    MLP of a mixture-of-experts layer (stacked gate_up_proj / down_proj) the hidden states of
    the tokens the model's router sent it (what its experts module is given) and, for down_proj,
    silu(x W_gateᵀ) · (x W_upᵀ) of them. Keys: tensor name, and ':e' for expert e."""
    seen = {}

    def add(name, x):
        seen[name] = torch.cat([seen[name], x]) if name in seen else x

    def hook(name):
        def fn(_m, args):
            add(name, args[0].reshape(-1, args[0].shape[-1]).double())

        return fn

    def experts_hook(name):
        def fn(m, args):
            hidden, top_k_index = args[0].double(), args[1]
            for e in range(m.gate_up_proj.shape[0]):
                x = hidden[(top_k_index == e).any(-1)]
                gate, up = (x @ m.gate_up_proj[e].double().T).chunk(2, dim=-1)
                add(f"{name}.gate_up_proj:{e}", x)
                add(f"{name}.down_proj:{e}", torch.nn.functional.silu(gate) * up)

        return fn

    experts = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert not experts or model.config.hidden_act == "silu"  # the experts' activation written above
    handles = [
        m.register_forward_pre_hook(hook(n + ".weight"))
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in TARGETS + FUSED
    ] + [m.register_forward_pre_hook(experts_hook(n)) for n, m in experts]
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in handles:
        h.remove()
    return seen


VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")  # the names in every architecture tested


def esm_merge(
    base_dir, expert_dirs, windows, alpha=1.0, gamma=0.15, p_task=2.0, p_dim=2.0, p_layer=2.0, embedding_merge="mean",
    preserve_norm=False, whiten_factors=True, rank_rule="output", expert_rank="budget",
):
    """rank_rule: 'output', the paper's k = ⌊d_out/T⌋; 'shorter', ⌊min(d_out, d_in)/T⌋."""
    base_model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = {k: v.double() for k, v in base_model.state_dict().items()}
    experts, inputs = [], []
    for d in expert_dirs:
        model = AutoModelForCausalLM.from_pretrained(d).eval()  # its whole forward, as transformers runs it
        experts.append({k: v.double() for k, v in model.state_dict().items()})
        inputs.append(capture_inputs(model, windows))
    T = len(experts)
    # merged_delta: (tensor, expert or None, block kind) → ΔW of that block
    merged_delta, out = {}, {}
    for name, w0 in base.items():
        deltas = [e[name] - w0 for e in experts]
        if w0.ndim == 3:  # stacked experts, E × d_out × d_in: each expert's matrix a linear of its own
            linears = [(f"{name}:{e}", e, name.split(".")[-1], [d[e] for d in deltas]) for e in range(w0.shape[0])]
        elif name in inputs[0]:
            linears = [(name, None, name.split(".")[-2], deltas)]
        else:
            combine = torch.sum if name in VOCABULARY and embedding_merge == "sum" else torch.mean
            out[name] = w0 + alpha * combine(torch.stack(deltas), 0)
            continue
        for key, expert, linear_kind, matrices in linears:
            start = 0
            for kind, rows in blocks_of(linear_kind, base_model.config, matrices[0].shape[0]):
                block = [d[start : start + rows] for d in matrices]
                start += rows
                k = max(1, (rows if rank_rule == "output" else min(rows, w0.shape[-1])) // T)
                # fewer tokens than k: the SVD basis, ESD's subspace for isotropic inputs (XᵀX = I)
                xs = [x[key] if x[key].shape[0] >= max(k, 2) else torch.eye(w0.shape[-1], dtype=torch.float64) for x in inputs]
                merged_delta[name, expert, kind] = esm_weight(block, xs, k, gamma, p_task, p_dim, preserve_norm, whiten_factors, expert_rank)
    # β per module type over the layers; an expert MLP's type is its own, and a layer's norm of
    # it is over all its experts together
    norms = {}
    for (name, expert, kind), delta in merged_delta.items():
        group = (kind if expert is None else f"experts.{kind}", int(name.split(".")[2]))
        norms[group] = norms.get(group, 0.0) + torch.linalg.matrix_norm(delta) ** 2
    norms = {group: square**0.5 for group, square in norms.items()}
    betas = {}
    for kind in {group[0] for group in norms}:
        groups = [group for group in norms if group[0] == kind]
        mean = sum(norms[g] for g in groups) / len(groups)
        scales = {g: (norms[g] / mean) ** p_layer for g in groups}
        if preserve_norm:  # Σ β²‖ΔW‖² = Σ ‖ΔW‖² over the layers of this module type
            ratio = (sum(norms[g] ** 2 for g in groups) / sum((scales[g] * norms[g]) ** 2 for g in groups)) ** 0.5
            scales = {g: b * ratio for g, b in scales.items()}
        betas.update(scales)
    for name in {key[0] for key in merged_delta}:
        layer = int(name.split(".")[2])
        by_expert = {}  # expert (None for a plain linear) → its blocks, β-scaled, in row order
        for (tensor, expert, kind), delta in merged_delta.items():
            if tensor == name:
                module_type = kind if expert is None else f"experts.{kind}"
                by_expert.setdefault(expert, []).append(betas[module_type, layer] * delta)
        if None in by_expert:
            update = torch.cat(by_expert[None])
        else:
            update = torch.stack([torch.cat(by_expert[e]) for e in sorted(by_expert)])
        out[name] = base[name] + alpha * update
    return out
