"""`alpha: auto` — α without labels: the α whose merged model best predicts what each expert
does differently from the base, on text the expert wrote itself, among the α whose merge
forgets no more of the base than the experts themselves did.

Each expert samples a little text (calibration/self_proxy.py). Its *distinctive tokens* are
those it predicts at least DISTINCTIVE_MARGIN nats better than the base does: where its
fine-tuning shows. The criterion is the merged model's cross-entropy on those tokens,
averaged per expert and then over experts (so each expert counts the same), minimised over α.

The criterion counts only what the experts gain, and a larger α keeps gaining on it while
the merge loses what the base could do. So the base writes samples too, and α is bounded by
a *retention budget*: the merge's mean loss increase on the base's own text may not exceed
what the expert that forgot least of it lost (each expert's loss on that text minus the
base's): the merged model keeps the base's own text at least as well as every one of the
experts it replaces. The bound is the experts' own behaviour, so it needs no constant tuned
to a zoo. `auto_alpha_budget: mean` bounds it by the experts' mean instead; experts that
forgot much of the base (a narrow full fine-tune) then raise the budget for all of them, and
on our second zoo that let α spend the base's general knowledge (docs/robustness.md).

Why not the plain loss on the samples: most sampled tokens are generic text that base and
expert predict alike; their loss only rises with α, so it picks an α near 1 where every
task is still weak (docs/zoo_studies.md). Closed forms that
match each layer's output shift (least squares of β·ΔW_merged against ΔW_t on X_t) pick α
far too small, because they judge each layer alone (docs/zoo_studies.md). The loss is evaluated out-of-core,
layer by layer from the cached merged updates, for several candidate α in one pass.
"""

import math
from typing import Literal

import torch
import tqdm

from mergekit_esm.calibration.layerwise import LayerStack
from mergekit_esm.errors import EsmInputError
from mergekit_esm.strength.search import golden_section_max
from mergekit_esm.weights import checked_reader


@torch.inference_mode()
def self_prediction_losses(prepared, windows: dict, alphas: list[float]) -> dict[float, dict]:
    """Per-token next-token cross-entropy of W0 + α·update on each expert's own samples:
    α → expert → losses.

    windows: expert → its token windows. Memory: one layer of each model plus the hidden
    states of every window for every α.
    """
    inputs = prepared.inputs
    layout = inputs.layout
    read_base = checked_reader(inputs.base, inputs.device)
    readers = [checked_reader(e, inputs.device) for e in inputs.experts]

    def update(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        base = read_base(name).to(torch.float32)
        # target weights come from the cached ΔW_merged: their expert tensors need no read
        experts = [] if prepared.is_target(name) else [r(name) for r in readers]
        return base, prepared.update(name, base, experts)

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
            stack.load_layer(index, lambda n: parts[n][0] + a * parts[n][1])
            for e in experts:
                hidden[a, e] = stack.run_layer(index, hidden[a, e])
            stack.release(index)
    norm_name, head_name = layout.head_names
    names = [f"{norm_name}.{n}" for n, _ in stack.model.get_submodule(norm_name).named_parameters()] + [head_name]
    parts = {n: update(n) for n in names}
    return {
        a: {e: stack.token_losses(hidden[a, e], windows[e], lambda n: parts[n][0] + a * parts[n][1]) for e in experts}
        for a in alphas
    }


@torch.inference_mode()
def model_token_losses(read_tensor, layout, windows: list[list[int]], device: str = "cpu") -> torch.Tensor:
    """Per-token next-token cross-entropy of one stored model on the windows, layer by layer."""
    stack = LayerStack(layout, device)
    hidden = stack.embed(read_tensor(layout.embed_name), windows)
    for index in range(layout.num_layers):
        stack.load_layer(index, read_tensor)
        hidden = stack.run_layer(index, hidden)
        stack.release(index)
    return stack.token_losses(hidden, windows, read_tensor)


RetentionBudget = Literal["least", "mean"]
BUDGET_WORDS = {"least": "the least-forgetting expert's", "mean": "the mean expert's"}
DISTINCTIVE_MARGIN = 1.0  # nats: the expert finds the token e ≈ 2.7× likelier than the base

# A coarse pass over 0.25–8 (×2 steps), then golden-section refinement on log α between the
# best candidate's neighbours: the labeled optimum lay between 1.7 and 4 across our
# settings, so the span leaves a factor 2–4 of margin on both sides.
COARSE_ALPHAS = [0.25 * 2**i for i in range(6)]


def distinctive_token_loss(merged: dict, base: dict, own: dict, margin: float) -> float:
    """Mean over experts of the merged model's mean loss on that expert's distinctive tokens.

    merged, base, own: expert → per-token losses of the merged model, the base and the
    expert itself on the expert's samples.
    """
    per_expert = []
    for expert, losses in merged.items():
        distinctive = base[expert] - own[expert] > margin
        if distinctive.any():
            per_expert.append(float(losses[distinctive].mean()))
    if not per_expert:
        raise EsmInputError(
            "alpha: auto found no token that an expert predicts clearly better than the base in "
            "its own samples, so it cannot judge the merge: set `alpha` to a number, or raise "
            "auto_alpha_samples"
        )
    return sum(per_expert) / len(per_expert)


def retention_cost(losses: torch.Tensor, base_losses: torch.Tensor) -> float:
    """Mean loss increase (nats per token) over the base's own loss on text the base wrote."""
    return float((losses - base_losses).mean())


def best_within_budget(criterion: dict[float, float], cost: dict[float, float], budget: float | None) -> float:
    """The α with the lowest criterion among those whose retention cost is within the budget
    (all of them without a budget); the least costly α when none is."""
    feasible = [a for a in criterion if budget is None or cost[a] <= budget]
    if not feasible:
        return min(cost, key=cost.get)
    return min(feasible, key=criterion.get)


def retention_budget(expert_costs: list[float], rule: RetentionBudget) -> float:
    """What the merge may cost the base's text: the least of the experts' own costs, or their mean."""
    return min(expert_costs) if rule == "least" else sum(expert_costs) / len(expert_costs)


def auto_alpha(
    prepared,
    windows: dict,
    refine_steps: int = 4,
    margin: float | None = None,
    base_windows=None,
    budget_rule: RetentionBudget = "least",
):
    """The α with the lowest distinctive-token loss within the retention budget, every (α,
    loss) evaluated, and every (α, retention cost) with the budget (None without base_windows:
    the budget is then off)."""
    margin = DISTINCTIVE_MARGIN if margin is None else margin
    inputs = prepared.inputs
    losses_of = lambda model, ws: model_token_losses(checked_reader(model, inputs.device), inputs.layout, ws, inputs.device)
    own = {e: losses_of(e, windows[e]) for e in windows}
    judged = dict(windows)
    budget = None
    if base_windows is not None:
        judged[inputs.base] = base_windows
    first = self_prediction_losses(prepared, judged, [0.0, *COARSE_ALPHAS])
    base = first.pop(0.0)
    if base_windows is not None:
        base_own = base.pop(inputs.base)
        budget = retention_budget([retention_cost(losses_of(e, base_windows), base_own) for e in windows], budget_rule)
    cost, criterion = {}, {}

    def judge(alpha: float, merged: dict) -> None:
        if base_windows is not None:
            cost[alpha] = retention_cost(merged.pop(inputs.base), base_own)
        else:
            cost[alpha] = 0.0
        criterion[alpha] = distinctive_token_loss(merged, base, own, margin)

    for alpha, merged in first.items():
        judge(alpha, merged)
    best = best_within_budget(criterion, cost, budget)

    def score(log_alpha: float) -> float:
        alpha = math.exp(log_alpha)
        if alpha not in criterion:
            judge(alpha, self_prediction_losses(prepared, judged, [alpha])[alpha])
        return -criterion[alpha] if budget is None or cost[alpha] <= budget else -math.inf

    golden_section_max(score, math.log(best / 2), math.log(best * 2), tolerance=0.05, max_evaluations=refine_steps)
    best = best_within_budget(criterion, cost, budget)
    return best, criterion, (cost if budget is not None else None, budget)
