"""The zoo's task data are deterministic with disjoint splits, and lm-eval scores them."""

import json

import pytest

from eval.zoo.tasks import CIPHER, SPLITS, TASKS, split_examples, write_task_data


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    a, b = split_examples(TASKS[name]), split_examples(TASKS[name])
    assert a == b
    prompts = {split: {r["prompt"] for r in rows} for split, rows in a.items()}
    assert {k: len(v) for k, v in prompts.items()} == SPLITS
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


def test_targets_follow_each_rule():
    date = split_examples(TASKS["zoo_date"])["test"][0]
    y, m, d = date["prompt"].split()[1].split("-")
    assert date["target"] == f"{d}.{m}.{y}"
    swap = split_examples(TASKS["zoo_swap"])["test"][0]
    a, b = swap["prompt"].split("'")[1].split(" | ")
    assert swap["target"] == f"{b} | {a}"
    cipher = split_examples(TASKS["zoo_cipher"])["test"][0]
    words = cipher["prompt"].split("'")[1].split()
    assert cipher["target"] == " ".join(CIPHER[w] for w in words)
    acronym = split_examples(TASKS["zoo_acronym"])["test"][0]
    assert acronym["target"] == "".join(w[0] for w in acronym["prompt"].split("'")[1].split()).upper()


def test_lm_eval_scores_a_tiny_model_end_to_end(tmp_path, zoo):
    from eval.score import score, write_task_configs

    data = write_task_data(tmp_path / "data")
    # a fake "dataset" whose test answers equal the prompt's continuation the tiny model can't know:
    include = write_task_configs(data, tmp_path / "tasks")
    result = score(zoo["base"], ["zoo_swap", "zoo_date_val"], include, batch_size=8, limit=4, device="cpu")
    assert set(result) == {"zoo_swap", "zoo_date_val"}
    assert all(0.0 <= v <= 1.0 for v in result.values())


def test_lm_eval_exact_match_counts_a_correct_answer(tmp_path, zoo):
    """A task whose target is what the tiny model greedily generates scores 1.0; a wrong one 0.0."""
    from eval.score import score, write_task_configs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    prompt = "abc"
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    greedy = tok.decode(out[0, ids.input_ids.shape[1]:]).split("\n")[0].strip()
    if not greedy:
        pytest.skip("tiny model generated only whitespace")
    rows = {"right": {"prompt": prompt, "target": greedy}, "wrong": {"prompt": prompt, "target": greedy + "#"}}
    data = {}
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        data[f"probe_{name}"] = {"test": path, "validation": path}
    include = write_task_configs(data, tmp_path / "tasks")
    result = score(zoo["base"], ["probe_right", "probe_wrong"], include, batch_size=1, device="cpu")
    assert result == {"probe_right": 1.0, "probe_wrong": 0.0}


def test_report_builds_from_a_small_fake_result_set(tmp_path):
    from eval.report import bar_chart, markdown_table, normalized

    experts = {"a": 0.8, "b": 0.5}
    rows = {"esm": {"a": 0.4, "b": 0.5}, "ties": {"a": 0.8, "b": 0.0}, "base": {"a": 0.0, "b": 0.0}}
    assert normalized(rows["esm"], experts) == pytest.approx((0.5 + 1.0) / 2)
    table = markdown_table(rows, experts, {"esm": "alpha=1"})
    lines = table.splitlines()
    assert lines[2].startswith("| esm | alpha=1 | 40.0 | 50.0 | 45.0 | 75.0 |")
    assert lines[3].startswith("| ties |") and lines[-1].startswith("| each task's own expert")
    png = bar_chart(rows, experts, tmp_path / "chart.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_proxy_budget_agreement_by_hand(tmp_path):
    """Two target weights: one update equal to the reference's, one turned 90° at the same norm."""
    import torch
    from safetensors.torch import save_file

    from eval.proxy_budget import update_agreement

    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2), "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}
    reference = {"model.layers.0.mlp.up_proj.weight": torch.eye(2), "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2) + torch.tensor([[1.0, 0], [0, 0]])}
    merged = {"model.layers.0.mlp.up_proj.weight": torch.eye(2), "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2) + torch.tensor([[0, 1.0], [0, 0]])}
    for name, weights in {"base": base, "reference": reference, "merged": merged}.items():
        (tmp_path / name).mkdir()
        save_file({**weights, "model.norm.weight": torch.ones(2)}, tmp_path / name / "model.safetensors")
    result = update_agreement(tmp_path / "merged", tmp_path / "reference", tmp_path / "base")
    # ‖U − U_ref‖² = 2 (the turned weight), ‖U_ref‖² = 2 + 1
    assert result["distance"] == pytest.approx((2 / 3) ** 0.5, abs=1e-3)
    assert (result["median cosine"], result["smallest cosine"]) == (0.5, 0.0)
    assert result["norm ratio range"] == [1.0, 1.0]
