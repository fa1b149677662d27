"""Run proxy tokens through one expert a decoder layer at a time and collect XᵀX.

Only one layer's weights and the proxy hidden states are in memory at once, so peak
memory does not grow with depth. Weights are read through a caller-supplied function
(mergekit's lazy loader in practice).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mergekit_esm.architecture import DecoderLayout, build_meta_model


@dataclass
class LayerMoments:
    layer: int
    moments: dict[str, torch.Tensor]  # input group → XᵀX (d_in × d_in), summed in float64
    n_tokens: int


@torch.inference_mode()
def layer_input_moments(
    read_tensor: Callable[[str], torch.Tensor],
    layout: DecoderLayout,
    windows: list[list[int]],
    device: str | torch.device = "cpu",
) -> Iterator[LayerMoments]:
    """Yield each layer's input second moments, in layer order, for this expert's weights."""
    model = build_meta_model(layout.config)
    embed = read_tensor(layout.embed_name)
    hidden = [embed[torch.tensor(w)].to(device, torch.float32)[None] for w in windows]
    del embed
    n_tokens = sum(len(w) for w in windows)

    rotary_meta = getattr(model.get_submodule(layout.layers_name.rsplit(".", 1)[0]), "rotary_emb")
    rotary = type(rotary_meta)(config=layout.config).to(device)
    position_embeddings = {}
    for h in hidden:
        length = h.shape[1]
        if length not in position_embeddings:
            ids = torch.arange(length, device=device)[None]
            position_embeddings[length] = (ids, rotary(h, ids))

    layers = model.get_submodule(layout.layers_name)
    for index in range(layout.num_layers):
        layer = layers[index]
        prefix = f"{layout.layers_name}.{index}."
        layer.load_state_dict(
            {
                name: read_tensor(prefix + name).to(device, torch.float32)
                for name, _ in layer.named_parameters()
            },
            assign=True,
        )
        moments: dict[str, torch.Tensor] = {}
        hooks = []
        for target in layout.layer_targets(index):
            if target.input_group in moments:
                continue  # q/k/v and gate/up read the same activation: count it once
            d_in = target.shape[1]
            # Summed in float64: the cut at rank k is sensitive to XᵀX where eigenvalues
            # cluster near λ_k (on the test zoo float32 sums moved merged weights by 4e-5).
            acc = moments[target.input_group] = torch.zeros(d_in, d_in, device=device, dtype=torch.float64)
            module = model.get_submodule(target.name.removesuffix(".weight"))

            def accumulate(_module, args, acc=acc, d_in=d_in):
                x = args[0].reshape(-1, d_in).to(torch.float64)
                acc.addmm_(x.T, x)

            hooks.append(module.register_forward_pre_hook(accumulate))
        for i, h in enumerate(hidden):
            ids, pe = position_embeddings[h.shape[1]]
            hidden[i] = layer(h, position_ids=ids, position_embeddings=pe)
        for hook in hooks:
            hook.remove()
        layer.to("meta")  # release this layer's weights before loading the next
        yield LayerMoments(layer=index, moments=moments, n_tokens=n_tokens)
