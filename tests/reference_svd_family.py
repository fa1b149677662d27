"""TSV-M, Iso-C and Iso-CTS written straight from their papers with dense SVDs (float64).

Shares no code with mergekit_esm; polar factors are U Vᵀ of a full SVD, spectra are
averaged over all min(d_out, d_in) singular values, as the authors' code does.
"""

import torch


def polar(m):
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def tsv_m(deltas, k):
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 0))


def iso_c(deltas):
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vh


def iso_cts(deltas, fraction):
    r, t = min(deltas[0].shape), len(deltas)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per_task = (r - common) // t
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for d in deltas:
        rest = d - u[:, :common] @ u[:, :common].T @ d
        ut, st, vt = torch.linalg.svd(rest, full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vs.append(vt[:per_task])
    sigma = torch.cat(ss).mean()
    return sigma * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 0))


def blocks_of(kind, config, rows):
    """A target linear's blocks as (kind, rows): Phi-3's fused qkv_proj stacks q (all heads),
    k and v (the key-value heads); gate_up_proj stacks gate and up halves (from its modeling
    code); any other linear is one block of its own."""
    if kind == "gate_up_proj":
        return [("gate_proj", rows // 2), ("up_proj", rows // 2)]
    if kind == "qkv_proj":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = config.num_key_value_heads * head_dim
        return [("q_proj", config.num_attention_heads * head_dim), ("k_proj", kv), ("v_proj", kv)]
    return [(kind, rows)]


def _blockwise(method, kind, deltas, config, fraction):
    """The method's update of one linear's task matrices, each block of a fused one on its own."""
    updates, start = [], 0
    for _, rows in blocks_of(kind, config, deltas[0].shape[0]):
        block = [d[start : start + rows] for d in deltas]
        start += rows
        updates.append(
            {
                "tsv": lambda: tsv_m(block, min(block[0].shape) // len(block)),
                "iso_c": lambda: iso_c(block),
                "iso_cts": lambda: iso_cts(block, fraction),
            }[method]()
        )
    return torch.cat(updates)


def svd_family_merge(method, base, experts, alpha, fraction=0.5, config=None):
    """W0 + α·update of every tensor (state dicts, float64): the method's update on the target
    weights (each block of a fused one, each expert MLP of a stacked experts tensor on its
    own), the mean task vector elsewhere (a mixture-of-experts router too)."""
    out = {}
    for name, w0 in base.items():
        deltas = [e[name] - w0 for e in experts]
        if name.endswith("proj.weight"):  # q/k/v/o, gate/up/down, fused ones (biases and norms take the mean)
            update = _blockwise(method, name.split(".")[-2], deltas, config, fraction)
        elif w0.ndim == 3:  # stacked experts: E × d_out × d_in
            kind = name.split(".")[-1]
            update = torch.stack([_blockwise(method, kind, [d[e] for d in deltas], config, fraction) for e in range(w0.shape[0])])
        else:
            update = torch.stack(deltas).mean(0)
        out[name] = w0 + alpha * update
    return out
