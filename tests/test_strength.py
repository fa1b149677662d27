"""Choosing α: golden-section search, the `tune` command, and `alpha: auto`."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_esm.strength.search import golden_section_max
from tests.conftest import merge_in_process, recipe


@pytest.mark.parametrize("peak,low,high", [(1.37, 0.0, 4.0), (0.05, 0.0, 2.0), (2.9, 0.0, 3.0), (3.3, 1.0, 10.0)])
def test_golden_section_finds_the_maximum_of_a_unimodal_function(peak, low, high):
    calls = []

    def f(x):
        calls.append(x)
        return -abs(x - peak) ** 1.5

    best, seen = golden_section_max(f, low, high, tolerance=0.01, max_evaluations=40)
    assert abs(best - peak) < 0.01
    assert len(calls) == len(set(calls)) == len(seen)  # every point evaluated once
    # the paper's budget (15 evaluations) still lands close on [0, 4]
    best15, seen15 = golden_section_max(f, low, high)
    assert len(seen15) <= 15 and abs(best15 - peak) <= (high - low) * 0.618**13


WEIGHT = "model.layers.1.mlp.down_proj.weight"


def test_tune_finds_the_alpha_of_a_known_unimodal_score(zoo, tmp_path, monkeypatch):
    """Score = −‖W(α) − W(1.37)‖² on one merged weight: the search must land on 1.37."""
    from mergekit_esm import cli
    from mergekit_esm.strength import tune as tune_module

    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    target_recipe = recipe(tmp_path / "target.yml", zoo["base"], zoo["experts"], {"alpha": 1.37, "proxy": str(zoo["proxy"])})
    assert merge_in_process(target_recipe, tmp_path / "target", tmp_path / "cache").returncode == 0
    target = load_file(tmp_path / "target" / "model.safetensors")[WEIGHT]

    def fake_score(path, tasks, include_path=None, **_):
        got = load_file(path / "model.safetensors")[WEIGHT]
        return {t: -float(((got - target) ** 2).sum()) for t in tasks}

    monkeypatch.setattr(tune_module, "score", fake_score)
    config = recipe(tmp_path / "r.yml", zoo["base"], zoo["experts"], {"proxy": str(zoo["proxy"])})
    out = tmp_path / "tuned"
    result = CliRunner().invoke(cli.main, ["tune", str(config), str(out), "--tasks", "a,b", "--max-trials", "20"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads((out / "tune.json").read_text())
    assert abs(report["best_alpha"] - 1.37) < 0.01
    assert yaml.safe_load((out / "best_recipe.yml").read_text())["parameters"]["alpha"] == pytest.approx(report["best_alpha"])
    assert (out / "score_vs_alpha.png").exists() and (out / "tune.md").exists()
    kept = load_file(out / "model" / "model.safetensors")[WEIGHT]  # the best merge is kept
    assert torch.allclose(kept, target, atol=1e-3)
    assert not (out / ".trials").exists()


def test_tune_with_real_lm_eval_on_a_local_task(zoo, tmp_path, monkeypatch):
    from eval.score import write_task_configs
    from eval.zoo.tasks import write_task_data
    from mergekit_esm import cli

    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    include = write_task_configs(write_task_data(tmp_path / "data"), tmp_path / "tasks")
    config = recipe(tmp_path / "r.yml", zoo["base"], zoo["experts"], merge_method="tsv")
    args = ["tune", str(config), str(tmp_path / "out"), "--tasks", "zoo_swap_val", "--include-path", str(include)]
    result = CliRunner().invoke(cli.main, args + ["--max-trials", "3", "--limit", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output[-2000:]
    trials = json.loads((tmp_path / "out" / "tune.json").read_text())["trials"]
    assert len(trials) == 3 and all(0.0 <= v["zoo_swap_val"] <= 1.0 for v in trials.values())


def test_tune_rejects_bad_input_with_one_clear_line(zoo, tmp_path):
    from mergekit_esm import cli

    ties = tmp_path / "ties.yml"
    ties.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(zoo["base"]), "models": []}))
    result = CliRunner().invoke(cli.main, ["tune", str(ties), str(tmp_path / "o"), "--tasks", "x"])
    assert result.exit_code != 0 and "Error: tune searches α of" in result.output
    config = recipe(tmp_path / "r.yml", zoo["base"], zoo["experts"])
    result = CliRunner().invoke(cli.main, ["tune", str(config), str(tmp_path / "o"), "--tasks", "no_such_task_xyz", "--max-trials", "1"])
    assert result.exit_code != 0 and "does not know the task(s) no_such_task_xyz" in result.output
    assert "Traceback" not in result.output


def _prepared(zoo, tmp_path, monkeypatch, parameters):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_esm.integration.preflight import preflight
    from mergekit_esm.integration.prepare import prepare

    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    config = recipe(tmp_path / "p.yml", zoo["base"], zoo["experts"], {"proxy": str(zoo["proxy"]), **parameters})
    return prepare(preflight(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), MergeOptions())), config


def test_self_prediction_losses_match_whole_merged_models(zoo, tmp_path, monkeypatch):
    """The out-of-core loss at α equals transformers' loss on the model mergekit-yaml writes at α."""
    from transformers import AutoModelForCausalLM

    from mergekit_esm.strength.auto import self_prediction_losses

    prepared, config = _prepared(zoo, tmp_path, monkeypatch, {})
    g = torch.Generator().manual_seed(0)
    windows = {e: [torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 33)] for e in prepared.inputs.experts[:2]}
    losses = self_prediction_losses(prepared, windows, [0.0, 0.7])
    for alpha in (0.0, 0.7):
        merged = yaml.safe_load(config.read_text())
        merged["parameters"]["alpha"] = alpha
        config.write_text(yaml.safe_dump(merged))
        out = tmp_path / f"m{alpha}"
        assert merge_in_process(config, out, tmp_path / "cache").returncode == 0
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        for expert, ws in windows.items():
            expected = []
            for w in ws:
                ids = torch.tensor([w])
                with torch.no_grad():
                    logits = model(ids).logits[0, :-1]
                expected.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
            assert torch.allclose(losses[alpha][expert], torch.cat(expected), atol=1e-4)


@pytest.fixture(scope="module")
def brute_force(zoo, tmp_path_factory):
    """An ESM merge of the tiny zoo, random "own samples" for each expert and the base, and
    every loss on a fine geometric α grid (0.1–10, steps of 8%), computed once for the
    brute-force checks of auto_alpha below."""
    from mergekit_esm.strength import auto
    from mergekit_esm.weights import checked_reader

    with pytest.MonkeyPatch.context() as mp:
        prepared, _ = _prepared(zoo, tmp_path_factory.mktemp("auto"), mp, {})
    inputs = prepared.inputs
    g = torch.Generator().manual_seed(1)
    windows = {e: [torch.randint(0, 256, (48,), generator=g).tolist() for _ in range(3)] for e in inputs.experts}
    base_windows = [torch.randint(0, 256, (48,), generator=g).tolist() for _ in range(3)]
    losses_of = lambda model, ws: auto.model_token_losses(checked_reader(model, "cpu"), inputs.layout, ws)
    grid = [0.1 * 1.08**i for i in range(60)]
    losses = auto.self_prediction_losses(prepared, {**windows, inputs.base: base_windows}, [0.0, *grid])
    base = losses.pop(0.0)
    base_own = losses_of(inputs.base, base_windows)
    base.pop(inputs.base)
    cost = {a: float((v.pop(inputs.base) - base_own).mean()) for a, v in losses.items()}
    expert_costs = [float((losses_of(e, base_windows) - base_own).mean()) for e in windows]
    own = {e: losses_of(e, windows[e]) for e in windows}
    margin = 0.02  # tiny random models differ from their base by little
    criterion = {a: auto.distinctive_token_loss(v, base, own, margin) for a, v in losses.items()}
    return {"prepared": prepared, "windows": windows, "base_windows": base_windows, "margin": margin,
            "grid": grid, "criterion": criterion, "cost": cost, "expert_costs": expert_costs}


def test_auto_alpha_agrees_with_a_brute_force_search_over_a_fine_grid(brute_force):
    """auto_alpha's pick scores as well on its criterion as the best of a fine α grid."""
    from mergekit_esm.strength import auto

    b = brute_force
    chosen, tried, (costs, budget) = auto.auto_alpha(b["prepared"], b["windows"], refine_steps=6, margin=b["margin"])
    assert costs is None and budget is None  # no base samples: no retention budget
    brute = b["criterion"]
    best = min(brute, key=brute.get)
    assert tried[chosen] <= brute[best] + 1e-3 * abs(brute[best]), (chosen, best)
    assert abs(math.log(chosen / best)) < 0.2, (chosen, best)


@pytest.mark.parametrize("rule", ["least", "mean"])
def test_auto_alpha_within_the_retention_budget_agrees_with_a_brute_force_search(brute_force, rule):
    """With the base's samples, auto_alpha picks the best α whose cost to the base's text is
    within the least-forgetting expert's (or the mean expert's), as a fine grid searched by
    hand does."""
    from mergekit_esm.strength import auto

    b = brute_force
    chosen, tried, (costs, budget) = auto.auto_alpha(
        b["prepared"], b["windows"], refine_steps=6, margin=b["margin"], base_windows=b["base_windows"], budget_rule=rule
    )
    expected_budget = min(b["expert_costs"]) if rule == "least" else sum(b["expert_costs"]) / len(b["expert_costs"])
    assert budget == pytest.approx(expected_budget, rel=1e-4)
    feasible = [a for a in b["grid"] if b["cost"][a] <= budget]
    assert feasible and len(feasible) < len(b["grid"]), "the test needs a budget that binds"
    best = min(feasible, key=b["criterion"].get)
    assert costs[chosen] <= budget + 1e-6
    assert tried[chosen] <= b["criterion"][best] + 1e-3 * abs(b["criterion"][best]), (chosen, best)


def test_best_within_budget_rules():
    from mergekit_esm.strength.auto import best_within_budget

    criterion = {0.5: 3.0, 1.0: 2.0, 2.0: 1.0}
    cost = {0.5: 0.1, 1.0: 0.2, 2.0: 0.4}
    assert best_within_budget(criterion, cost, None) == 2.0
    assert best_within_budget(criterion, cost, 0.25) == 1.0
    assert best_within_budget(criterion, cost, 0.05) == 0.5  # none within: the least costly


def test_alpha_auto_end_to_end_writes_the_chosen_alpha_into_the_card(zoo, tmp_path, monkeypatch):
    from mergekit.scripts.run_yaml import main as mergekit_yaml_main

    from mergekit_esm.strength import auto

    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "DISTINCTIVE_MARGIN", 0.02)  # tiny random experts differ by little
    parameters = {"alpha": "auto", "auto_alpha_samples": 2, "auto_alpha_max_tokens": 32, "proxy": str(zoo["proxy"])}
    config = recipe(tmp_path / "auto.yml", zoo["base"], zoo["experts"], parameters, merge_method="esm")
    result = CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output[-2000:]
    card = (tmp_path / "out" / "README.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith("| α chosen by alpha: auto |"))
    cost = next(l for l in card.splitlines() if l.startswith("| alpha: auto's cost to the base |"))
    assert "budget, the least-forgetting expert's" in cost  # the default bound, named
    chosen = float(line.split("|")[2].split()[0])
    assert 0.25 / 2 <= chosen <= 8 * 2 and "| alpha | auto |" in card


def test_every_method_accepts_alpha_auto():
    from mergekit_esm.methods import METHODS

    for method in METHODS.values():
        assert method.settings_type(alpha="auto").alpha == "auto", method.name
        with pytest.raises(ValueError):
            method.settings_type(alpha=-1)
