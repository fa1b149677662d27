"""`alpha: auto` — α without labels: the α whose merged model best predicts the text each
expert wrote itself (its own samples as pseudo-labels), averaged over the experts.

Why this criterion: closed forms that match layer outputs to the experts' (least squares
of β·ΔW_merged against ΔW_t on X_t) pick α 10–40× too small on LLM experts, because they
score each layer alone, while what a merge must keep is the experts' end-to-end behaviour.
The expert's own samples show that behaviour without labels; the loss is evaluated
out-of-core, layer by layer, for all candidate α in one pass over the weights.
"""

import math

import torch
import tqdm

from mergekit_esm.calibration.layerwise import LayerStack


@torch.inference_mode()
def self_prediction_losses(prepared, windows: dict, alphas: list[float]) -> dict[float, dict]:
    """Per-token next-token cross-entropy of W0 + α·update on each expert's own samples:
    α → expert → losses.

    windows: expert → its token windows. Memory: one layer of each model plus the hidden
    states of every window for every α.
    """
    from mergekit_esm.integration.prepare import checked_reader

    inputs = prepared.inputs
    layout = inputs.layout
    read_base = checked_reader(inputs.base, inputs.device)
    readers = [checked_reader(e, inputs.device) for e in inputs.experts]

    def update(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        base = read_base(name).to(torch.float32)
        return base, prepared.update(name, base, [r(name) for r in readers])

    stack = LayerStack(layout, inputs.device)
    experts = list(windows)
    base, delta = update(layout.embed_name)
    hidden = {(a, e): stack.embed(base + a * delta, windows[e]) for a in alphas for e in experts}
    del base, delta
    for index in tqdm.trange(layout.num_layers, desc="ESM alpha: auto"):
        prefix = f"{layout.layers_name}.{index}."
        names = [prefix + n for n, _ in stack.layers[index].named_parameters()]
        parts = {n: update(n) for n in names}
        for a in alphas:
            layer = stack.load_layer(index, lambda n: parts[n][0] + a * parts[n][1])
            for e in experts:
                hidden[a, e] = stack.run_layer(layer, hidden[a, e])
            stack.release(index)
        del parts
    norm_name, head_name = layout.head_names
    norm, head = update(norm_name), update(head_name)
    return {
        a: {
            e: stack.token_losses(hidden[a, e], windows[e], norm[0] + a * norm[1], head[0] + a * head[1])
            for e in experts
        }
        for a in alphas
    }


@torch.inference_mode()
def model_token_losses(read_tensor, layout, windows: list[list[int]], device: str = "cpu") -> torch.Tensor:
    """Per-token next-token cross-entropy of one stored model on the windows, layer by layer."""
    stack = LayerStack(layout, device)
    hidden = stack.embed(read_tensor(layout.embed_name), windows)
    for index in range(layout.num_layers):
        hidden = stack.run_layer(stack.load_layer(index, read_tensor), hidden)
        stack.release(index)
    norm_name, head_name = layout.head_names
    return stack.token_losses(hidden, windows, read_tensor(norm_name), read_tensor(head_name))


# Candidates span 0.25–8 (×2 steps), then one golden-section refinement between the
# neighbours of the best: the strength that scores best moved between 1 and 4 across
# our settings, so the span leaves a factor 4 of margin on both sides.
COARSE_ALPHAS = [0.25 * 2**i for i in range(6)]


def auto_alpha(prepared, windows: dict, refine_steps: int = 4) -> tuple[float, dict[float, float]]:
    """The α with the lowest self-prediction loss, and every (α, loss) evaluated."""
    from mergekit_esm.strength.search import golden_section_max

    losses = dict(zip(COARSE_ALPHAS, self_prediction_losses(prepared, windows, COARSE_ALPHAS)))
    best = min(losses, key=losses.get)
    low, high = best / 2, best * 2
    # golden section on log α between the best's neighbours, one pass per step
    _, refined = golden_section_max(
        lambda x: -self_prediction_losses(prepared, windows, [math.exp(x)])[0],
        math.log(low),
        math.log(high),
        tolerance=0.05,
        max_evaluations=refine_steps,
    )
    losses.update({math.exp(x): -v for x, v in refined.items()})
    best = min(losses, key=losses.get)
    return best, losses
