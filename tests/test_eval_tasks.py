"""The zoos' task data are deterministic with disjoint splits, lm-eval scores them, and the
retention measures and the subset sampler behave as specified."""

import json
import re
import shutil
from pathlib import Path

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
    with_retention = markdown_table(rows, experts, {}, retention={"esm": {"quiz": 0.25, "nll": 3.5}}).splitlines()
    assert with_retention[0].endswith("| quiz | held-out NLL |")
    assert with_retention[2].endswith("| 75.0 | 25.0 | 3.500 |") and with_retention[3].endswith("| | |")
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


# --- the second zoo, the retention measures and the subset protocol ---------------------------


@pytest.mark.parametrize("name", sorted(__import__("eval.zoo.community", fromlist=["TASKS"]).TASKS))
def test_community_splits_are_deterministic_and_disjoint(name):
    from eval.zoo.community import task_splits

    a, b = task_splits(name), task_splits(name)
    assert a == b
    prompts = {split: {r["prompt"] for r in rows} for split, rows in a.items()}
    assert len(prompts["validation"]) == 60 and len(prompts["test"]) == 120
    assert all(len(p) == len(a[s]) for s, p in prompts.items())  # no repeated prompt in a split
    for x, y in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[x] & prompts[y]


def test_community_plural_splits_share_no_noun():
    """The plural test asks for nouns never seen in training, not only new phrasings."""
    from eval.zoo.community import task_splits

    nouns = {s: {r["target"] for r in rows} for s, rows in task_splits("cz_plural").items()}
    assert not nouns["train"] & nouns["test"] and not nouns["train"] & nouns["validation"]


def test_community_targets_follow_each_rule():
    import re

    from eval.zoo.community import task_splits

    add = json.loads(task_splits("cz_add")["test"][0]["prompt"])[0]["content"]
    a, b = map(int, re.findall(r"\d+", add))
    assert task_splits("cz_add")["test"][0]["target"] == str(a + b)
    sub = task_splits("cz_subtract")["test"][0]
    a, b = map(int, re.findall(r"\d+", sub["prompt"]))
    assert sub["target"] == str(a - b)
    for name, rule in (("cz_sort", sorted), ("cz_reverse", lambda w: w[::-1])):
        row = task_splits(name)["test"][0]
        assert row["target"].split() == rule(row["prompt"].split(": ")[1].split())
    chat = task_splits("cz_chat")["test"][0]
    turns = json.loads(chat["prompt"])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert chat["target"].lower() in turns[0]["content"].lower() and chat["target"].isupper()


def test_community_chat_prompts_go_through_the_chat_template():
    from eval.zoo.community import CHAT_TASKS, render, task_splits

    class Template:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    row = task_splits("cz_chat")["test"][0]
    assert render("cz_chat", row["prompt"], Template()).startswith("<user>I have a ")
    raw = task_splits("cz_sort")["test"][0]["prompt"]
    assert "cz_sort" not in CHAT_TASKS and render("cz_sort", raw, Template()) == raw


@pytest.mark.parametrize(
    "reply, answers, expected",
    [
        ("The plural of 'baby' is 'babies'.", ["babies"], True),
        ("babiesx", ["babies"], False),
        ("\n  it is 58\nthen 12", ["58"], True),
        ("it is 158", ["58"], False),
        ("first line\nParis", ["Paris"], False),  # only the first non-empty line counts
        ("leonardo DA VINCI painted it", ["Leonardo da Vinci"], True),
        ("", ["x"], False),
    ],
)
def test_answer_in_reply(reply, answers, expected):
    from eval.answer_match import answer_in_reply, process_results

    assert answer_in_reply(reply, answers) is expected
    doc = {"target": answers[0], "aliases": ["zzz"]}
    assert process_results(doc, [reply]) == {"answer_in_reply": float(expected)}
    assert process_results(doc, ["zzz"]) == {"answer_in_reply": 1.0}


def test_quiz_splits_are_deterministic_and_disjoint():
    from eval.retention import quiz_splits

    a, b = quiz_splits(), quiz_splits()
    assert a == b and len(a["validation"]) == len(a["test"]) == 40
    assert not {r["prompt"] for r in a["validation"]} & {r["prompt"] for r in a["test"]}


def test_heldout_nll_of_a_uniform_model_is_log_vocab(tmp_path):
    """A model with a zero output layer predicts every token with probability 1/V."""
    import math

    import torch
    from transformers import LlamaForCausalLM

    from eval.retention import heldout_nll
    from tests.tiny_models import tiny_config, write_model

    config = tiny_config()
    state = {k: (torch.zeros_like(v) if k == "lm_head.weight" else v) for k, v in LlamaForCausalLM(config).state_dict().items()}
    model = write_model(tmp_path / "uniform", state, config)
    text = "The first paragraph, long enough to span windows.\n\nA second one."
    assert heldout_nll(model, text, window=16, batch_size=3) == pytest.approx(math.log(config.vocab_size), rel=1e-6)


def test_heldout_nll_matches_a_direct_computation(zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.retention import heldout_nll

    text = "abc def ghi jkl mno\n\nxyz"
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    losses = []
    for paragraph in text.split("\n\n"):
        ids = torch.tensor([tok(paragraph)["input_ids"]])
        logits = model(ids).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    expected = float(torch.cat(losses).mean().detach())
    assert heldout_nll(zoo["base"], text, window=256) == pytest.approx(expected, rel=1e-5)


def test_quiz_scores_a_known_answer_through_the_chat_template(tmp_path, zoo):
    """The quiz's lm-eval path credits the tiny model's own greedy reply and not a wrong one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.retention import render_chat
    from eval.score import score, write_task_configs

    model_dir = tmp_path / "chat-model"
    shutil.copytree(zoo["base"], model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tok.save_pretrained(model_dir)
    assert render_chat("abc?", tok) == "<user>abc?<assistant>"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for question in ("abc?", "What is it?", "x", "Name one.", "q1", "q2", "q3", "q4"):
        prompt = render_chat(question, tok)
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        reply = tok.decode(out[0, ids.input_ids.shape[1]:])
        first_line = next((l for l in reply.strip().splitlines() if l.strip()), "")
        words = re.findall(r"\w+", first_line)
        if words:
            break
    else:
        pytest.skip("the tiny model wrote no word for any prompt")
    data = {}
    for name, row in {"right": {"prompt": prompt, "target": words[0], "aliases": []},
                      "wrong": {"prompt": prompt, "target": "qqqq", "aliases": []}}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        data[f"quiz_{name}"] = {"test": path, "validation": path}
    include = write_task_configs(data, tmp_path / "tasks", scorer="answer_in_reply")
    result = score(model_dir, ["quiz_right", "quiz_wrong"], include, batch_size=1, device="cpu")
    assert result == {"quiz_right": 1.0, "quiz_wrong": 0.0}


def test_subset_sampler_is_seeded_and_covers_every_size():
    from eval.robustness import subsets, subsets_per_size

    assert subsets(6, 3, 5) == subsets(6, 3, 5)
    draw = subsets(6, 3, 5)
    assert len(set(draw)) == 5 and all(len(s) == 3 and len(set(s)) == 3 and max(s) < 6 for s in draw)
    assert subsets(6, 3, 5, seed=1) != draw  # the seed matters
    assert len(subsets(4, 3, 5)) == 4  # all of them when the zoo has fewer
    for n, size in [(6, 2), (6, 3), (8, 4), (12, 2)]:  # more subsets extend fewer
        for fewer in range(1, 8):
            assert set(subsets(n, size, fewer)) <= set(subsets(n, size, fewer + 3))
    plan = subsets_per_size(6, 2)
    assert sorted(plan) == [2, 3, 4, 5, 6] and plan[6] == [(0, 1, 2, 3, 4, 5)]
    assert all(len(v) == 2 for k, v in plan.items() if k < 6)


def test_lora_expert_is_written_as_full_weights_with_a_low_rank_update(tmp_path, zoo):
    """A LoRA fine-tune is merged into full weights: its task vector on a target linear has rank ≤ r."""
    import torch
    from safetensors.torch import load_file

    from eval.zoo.finetune import finetune

    rows = [{"prompt": f"q{i}", "target": f"a{i}"} for i in range(8)]
    out = finetune(zoo["base"], rows, tmp_path / "lora", steps=3, batch_size=4, lr=1e-2, lora_rank=2)
    before = load_file(zoo["base"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)  # no adapter tensors left
    delta = after["model.layers.0.mlp.up_proj.weight"] - before["model.layers.0.mlp.up_proj.weight"]
    assert delta.abs().max() > 0
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 2
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(after[norm], before[norm])  # LoRA touches only the target linears


def test_robustness_report_from_a_small_fake_result_set(tmp_path, monkeypatch):
    """Tables, win rates and plots come out of cached scores without merging anything."""
    import eval.robustness as rb
    from eval.compare import Results

    monkeypatch.setattr(rb, "RESULTS", tmp_path)
    results = Results(tmp_path / "results.json")
    score = lambda acc, quiz, nll: {"tasks": acc, "quiz": quiz, "nll": nll}
    for split in ("validation", "test"):
        results.put(score({"a": 0.0, "b": 0.0, "c": 0.0}, 0.8, 3.0), "toy", "base", split)
        for t in "abc":
            results.put(score({t: 1.0}, 0.5, 3.2), "toy", "expert", t, split)
    run = rb.ZooScores("toy", results)
    default = rb.default_setting("esm")["alpha"]  # the sweep's second row is ESM's default α
    assert run.tasks == ["a", "b", "c"]
    # subset a+b: esm beats TA (0.9 vs 0.5) and keeps the base within the margin; ties does neither
    draws = {"a+b": {"esm": 0.9, "task_arithmetic": 0.5, "ties": 0.4}, "b+c": {"esm": 0.6, "task_arithmetic": 0.7, "ties": 0.8}}
    for members, accs in draws.items():
        for method, acc in accs.items():
            kept = (0.75, 3.1) if method == "esm" and members == "a+b" else (0.2, 3.6)
            results.put(score({t: acc for t in members.split("+")}, *kept), "toy", "subsets", "2", members, method, rb.DEFAULT)
    for label, acc in (("alpha=1.0", 0.5), (f"alpha={default}", 0.9)):
        results.put(score({"a": acc, "b": acc, "c": acc}, 0.5, 3.3), "toy", "sweep", "esm", label)
    results.put({**score({"a": 0.8, "b": 0.8, "c": 0.8}, 0.6, 3.2), "alpha": 2.5}, "toy", "auto", "esm")
    results.put(score({"a": 0.6, "b": 0.6, "c": 0.6}, 0.5, 3.3), "toy", "sweep", "tsv", "alpha=1.0")
    results.put({**score({"a": 0.7, "b": 1.0, "c": 0.4}, 0.45, 3.4), "merge_s": 12.5, "peak_anon_mib": 900},
                "toy", "chosen", "esm", f"alpha={default}")
    text, curves = rb.summarize(run, ["esm", "task_arithmetic", "ties"])
    assert f"| esm | alpha={default} | 70.0 | 45.0 | 3.400 | 12.5 | 900 | 70.0 | 100.0 | 40.0 |" in text
    assert "| esm | alpha: auto (chose 2.5) | 80.0 | 60.0 | 3.200 |" in text
    row = next(l for l in text.splitlines() if l.startswith("| 2 | 2 | esm | default |"))
    assert row == "| 2 | 2 | esm | default | 75.0 | 47.5 | 3.350 | 1/2 | 1/2 |"
    ties = next(l for l in text.splitlines() if l.startswith("| 2 | 2 | ties | default |"))
    assert ties.endswith("| 1/2 | 0/2 |")
    assert f"| esm | alpha={default} (default) | 90.0 | 50.0 | 3.300 |  |  |" in text  # dominated by nothing
    # tsv keeps more tasks at the same quiz and NLL than esm at α 1; esm's auto point beats tsv on all three
    assert "| esm | alpha=1.0 | 50.0 | 50.0 | 3.300 |  | tsv alpha=1.0 |" in text
    assert f"| tsv | alpha=1.0 (default) | 60.0 | 50.0 | 3.300 |  | esm alpha={default}, esm alpha: auto (chose 2.5) |" in text
    assert curves[("esm", rb.DEFAULT)] == [(2, 0.75, 0.475, 3.35)]
    assert run.chosen("esm") == {"alpha": default}
    rb.plot_by_size({"toy": curves}, tmp_path / "by_T.png")
    rb.plot_pareto(run, ["esm"], tmp_path / "pareto.png", "test")
    for png in ("by_T.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_reports_time_and_peak_memory_and_reuses_a_finished_merge(zoo, tmp_path):
    """The comparison's merges go through the real mergekit-yaml with the benchmark's memory
    probe; a merge already on disk is returned as cached (0 s, no peaks), an interrupted one
    (no config.json) is not."""
    from eval.compare import merge

    run = merge("task_arithmetic", {"weight": 0.5}, zoo["base"], zoo["experts"], tmp_path)
    assert (run["path"] / "config.json").exists()
    assert run["wall_s"] > 0 and run["peak_anon_mib"] > 0 and run["peak_rss_mib"] >= run["peak_anon_mib"] > 0
    again = merge("task_arithmetic", {"weight": 0.5}, zoo["base"], zoo["experts"], tmp_path)
    assert again == {"path": run["path"], "wall_s": 0.0}
    (run["path"] / "config.json").unlink()
    assert merge("task_arithmetic", {"weight": 0.5}, zoo["base"], zoo["experts"], tmp_path)["wall_s"] > 0


def test_protocol_redoes_and_rescores_a_cached_merge_whose_settings_changed(tmp_path, monkeypatch):
    """A subset's "default" key outlives a change of the method's defaults: the merge is redone
    when the full settings it was made with differ from today's, and scored afresh (not read
    back from the stale entry); with the same settings it is neither merged nor scored again.
    `alpha: auto`'s own options count only where α is auto."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir, run.include = "toy", Results(tmp_path / "results.json"), tmp_path, None
    run.base, run.experts = tmp_path, {"a": tmp_path}
    merges, accuracy = [], iter([0.25, 0.75, 0.5, 0.5])

    def fake_merge(method, setting, base, experts, workdir, model_parameters, cache):
        merges.append(setting)
        (path := tmp_path / f"merge{len(merges)}").mkdir()
        (path / "README.md").write_text("| α chosen by alpha: auto | 2.5 |\n")
        return {"path": path, "wall_s": 1.0}

    monkeypatch.setattr(rb, "merge", fake_merge)
    monkeypatch.setattr(rb, "score", lambda model, names, include: dict.fromkeys(names, next(accuracy)))
    monkeypatch.setattr(rb, "heldout_nll", lambda model: 3.0)
    key = ("subsets", "1", "a", "esm", rb.DEFAULT)
    first = run.merged(key, "esm", {"alpha": 2.0}, ["a"], "test")
    assert run.merged(key, "esm", {"alpha": 2.0}, ["a"], "test") == first and len(merges) == 1
    assert first["tasks"] == {"a": 0.25} and first["setting"]["task_exponent"] == 0.0
    assert run.merged(key, "esm", {"alpha": 2.0, "auto_alpha_budget": "mean"}, ["a"], "test") == first
    assert len(merges) == 1
    redone = run.merged(key, "esm", {"alpha": 2.0, "task_exponent": 2.0}, ["a"], "test")
    assert len(merges) == 2 and redone["tasks"] == {"a": 0.75} and redone["setting"]["task_exponent"] == 2.0
    assert run.results.get("toy", *key) == redone
    auto = ("subsets", "1", "a", "esm", "auto")
    run.merged(auto, "esm", {"alpha": "auto"}, ["a"], "test")
    run.merged(auto, "esm", {"alpha": "auto", "auto_alpha_budget": "mean"}, ["a"], "test")
    assert len(merges) == 4


def test_protocol_redoes_a_merge_made_before_a_fix_that_applies_to_it(tmp_path, monkeypatch):
    """A fix that changes what a setting merges, without changing the setting, makes the rows
    it touched stale and only those: a row recorded before it is merged again, one recorded
    after it is read back, and rows the fix does not touch keep their cached scores."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir, run.include = "toy", Results(tmp_path / "results.json"), tmp_path, None
    run.base, run.experts = tmp_path, {"a": tmp_path}
    merges = []

    def fake_merge(method, setting, base, experts, workdir, model_parameters, cache):
        merges.append(setting)
        (path := tmp_path / f"merge{len(merges)}").mkdir()
        return {"path": path, "wall_s": 1.0}

    monkeypatch.setattr(rb, "merge", fake_merge)
    monkeypatch.setattr(rb, "score", lambda model, names, include: dict.fromkeys(names, 0.5))
    monkeypatch.setattr(rb, "heldout_nll", lambda model: 3.0)
    touched, untouched = {"whiten_factors": False, "alpha": 1.0}, {"alpha": 1.0}
    monkeypatch.setattr(rb, "FIXES", ())
    for setting in (touched, untouched):
        run.merged(("sweep", "esm", rb._label(setting)), "esm", setting, ["a"], "validation")
    assert len(merges) == 2 and "fixes" not in run.results.get("toy", "sweep", "esm", rb._label(touched))
    monkeypatch.setattr(rb, "FIXES", (("a fix", "esm", ({"whiten_factors": False},)),))
    for setting in (touched, untouched):
        run.merged(("sweep", "esm", rb._label(setting)), "esm", setting, ["a"], "validation")
    assert merges == [touched, untouched, touched]
    assert run.results.get("toy", "sweep", "esm", rb._label(touched))["fixes"] == ["a fix"]
    run.merged(("sweep", "esm", rb._label(touched)), "esm", touched, ["a"], "validation")
    assert len(merges) == 3
    assert rb.fixes_applying("tsv", rb.full_setting("tsv", {"alpha": 1.0})) == []


def test_subset_caches_share_self_written_samples_and_removing_one_keeps_them(tmp_path):
    """Each set of members has its own cache of merged updates, but one store of self-written
    samples; removing a set's cache, as the protocol does after its merges, keeps the samples."""
    import shutil

    import eval.robustness as rb

    first, second = rb.esm_cache(tmp_path, ["a", "b"]), rb.esm_cache(tmp_path, ["a", "c"])
    assert first != second and first == rb.esm_cache_dir(tmp_path, ["a", "b"])
    (first / "self-proxy" / "key").mkdir()
    assert (second / "self-proxy" / "key").is_dir()
    shutil.rmtree(first)
    assert (second / "self-proxy" / "key").is_dir() and rb.esm_cache(tmp_path, ["a", "b"]) == first
    assert (first / "self-proxy" / "key").is_dir()


def test_in_task_proxy_merges_with_each_experts_training_examples_as_its_proxy(tmp_path, monkeypatch):
    """The protocol's "in-task proxy" setting reaches the recipe as per-model `proxy` files
    holding each member's own training examples, in member order, and is recorded as
    `proxy: in-task` so that it is cached apart from the default."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir, run.include = "toy", Results(tmp_path / "results.json"), tmp_path, None
    run.base, run.experts, run.data = tmp_path, {"a": tmp_path, "b": tmp_path}, {}
    for task in "ab":
        (train := tmp_path / f"{task}.jsonl").write_text(json.dumps({"prompt": f"say {task}", "target": task.upper()}) + "\n")
        run.data[task] = {"train": str(train)}
    calls = []

    def fake_merge(method, setting, base, experts, workdir, model_parameters, cache):
        calls.append((setting, model_parameters))
        (path := tmp_path / f"merge{len(calls)}").mkdir()
        return {"path": path, "wall_s": 1.0}

    monkeypatch.setattr(rb, "merge", fake_merge)
    monkeypatch.setattr(rb, "score", lambda model, names, include: dict.fromkeys(names, 0.5))
    monkeypatch.setattr(rb, "heldout_nll", lambda model: 3.0)
    key = ("subsets", "2", "b+a", "esm", "in-task proxy")
    scores = run.merged(key, "esm", {"alpha": 3.0, "proxy": rb.IN_TASK}, ["b", "a"], "test")
    setting, per_model = calls[0]
    assert "proxy" not in setting and [Path(p["proxy"]).stem for p in per_model] == ["b", "a"]
    assert json.loads(Path(per_model[0]["proxy"]).read_text()) == {"text": "say b B"}
    assert scores["setting"]["proxy"] == rb.IN_TASK
    run.merged(("subsets", "2", "b+a", "esm", rb.DEFAULT), "esm", {"alpha": 3.0}, ["b", "a"], "test")
    assert calls[1] == ({"alpha": 3.0}, None)


def test_protocol_merges_esm_ablation_rows_on_both_proxies(tmp_path, monkeypatch):
    """--with-ablations merges ESM (only) at each ablation setting, and with
    --with-in-task-proxy each of them on the in-task proxy too, under keys of their own."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir, run.tasks = "toy", Results(tmp_path / "results.json"), tmp_path, ["a", "b"]
    merged = []
    monkeypatch.setattr(run, "merged", lambda key, method, setting, members, split: merged.append((key[3:], setting)))
    unwhitened = {"whiten_factors": False, "alpha": 0.5}
    run.protocol(["esm", "tsv"], per_size=5, with_chosen=False, sizes={2}, in_task_proxy=True,
                 ablations={"no whitening, α 0.5": unwhitened})
    assert merged == [
        (("esm", rb.DEFAULT), rb.default_setting("esm")),
        (("esm", "no whitening, α 0.5"), unwhitened),
        (("esm", rb.IN_TASK_PROXY), {**rb.default_setting("esm"), "proxy": rb.IN_TASK}),
        (("esm", f"no whitening, α 0.5, {rb.IN_TASK_PROXY}"), {**unwhitened, "proxy": rb.IN_TASK}),
        (("tsv", rb.DEFAULT), rb.default_setting("tsv")),
    ]


def test_protocol_merges_each_method_at_the_named_strengths_and_reports_its_curve_per_T(tmp_path, monkeypatch):
    """--subset-strengths merges each named method at each strength but its default's, its other
    settings at their defaults; the report draws each method's curve at T from the subsets
    where a strength was swept (not from subsets merged at the defaults only), every point
    over the same subsets, and names the other methods' points that dominate it."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir, run.tasks = "toy", Results(tmp_path / "results.json"), tmp_path, ["a", "b"]
    merged = []
    monkeypatch.setattr(run, "merged", lambda key, method, setting, members, split: merged.append((key[3:], setting)))
    default = rb.default_setting("esm")["alpha"]
    run.protocol(["esm", "ties"], per_size=5, with_chosen=False, sizes={2},
                 strengths={"esm": (default, default + 1), "ties": (0.7,)})
    assert merged == [
        (("esm", rb.DEFAULT), {"alpha": default}),
        (("esm", f"alpha {default + 1:g}"), {"alpha": default + 1}),
        (("ties", rb.DEFAULT), rb.default_setting("ties")),
        (("ties", "weight 0.7"), {**rb.default_setting("ties"), "weight": 0.7}),
    ]

    monkeypatch.setattr(rb, "RESULTS", tmp_path)
    results = Results(tmp_path / "results.json")
    for t in "abc":
        results.put({"tasks": {t: 1.0}, "quiz": 0.5, "nll": 3.2}, "toy", "expert", t, "test")
    results.put({"tasks": {t: 0.0 for t in "abc"}, "quiz": 0.8, "nll": 3.0}, "toy", "base", "test")
    stronger = f"alpha {default + 1:g}"
    rows = {  # (draw, method, setting): (accuracy on each task, quiz, NLL)
        ("a+b", "esm", rb.DEFAULT): (0.6, 0.7, 3.1), ("b+c", "esm", rb.DEFAULT): (0.8, 0.5, 3.3),
        ("a+b", "esm", stronger): (0.8, 0.5, 3.3), ("b+c", "esm", stronger): (1.0, 0.3, 3.5),
        ("a+b", "tsv", rb.DEFAULT): (0.8, 0.6, 3.2), ("b+c", "tsv", rb.DEFAULT): (0.8, 0.6, 3.2),
        ("a+b", "tsv", "alpha 0.3"): (0.4, 0.7, 3.1), ("b+c", "tsv", "alpha 0.3"): (0.4, 0.7, 3.1),
        ("a+b", "task_arithmetic", rb.DEFAULT): (0.5, 0.5, 3.5),  # no other strength: no curve
        ("a+c", "esm", rb.DEFAULT): (0.0, 0.0, 9.0), ("a+c", "tsv", rb.DEFAULT): (0.0, 0.0, 9.0),  # not swept
    }
    for (draw, method, which), (acc, quiz, nll) in rows.items():
        results.put({"tasks": dict.fromkeys(draw.split("+"), acc), "quiz": quiz, "nll": nll},
                    "toy", "subsets", "2", draw, method, which)
    run = rb.ZooScores("toy", results)
    curves = rb.strength_curves(run, ["esm", "tsv", "task_arithmetic"])
    assert set(curves[2]) == {"esm", "tsv"} and curves[2]["esm"][0] == 2
    assert [p[0] for p in curves[2]["esm"][1]] == [default, default + 1]
    lines = rb.strength_table(run, ["esm", "tsv", "task_arithmetic"])
    # TSV-M's default keeps more of the tasks than ESM's, and as much of the base
    # TSV-M's curve: 40% of the tasks at NLL 3.1 (α 0.3), 80% at 3.2 (α 1); ESM's: 70% at 3.2, 90% at 3.4
    assert f"| 2 | 2 | esm | alpha {default:g} (default) | 70.0 | 60.0 | 3.200 | tsv alpha 1 | tsv 80.0 |" in lines
    assert f"| 2 | 2 | esm | {stronger} | 90.0 | 40.0 | 3.400 |  |  |" in lines  # beyond TSV-M's range
    assert "| 2 | 2 | tsv | alpha 1 (default) | 80.0 | 60.0 | 3.200 |  | esm 70.0 |" in lines
    assert "| 2 | 2 | tsv | alpha 0.3 | 40.0 | 70.0 | 3.100 |  |  |" in lines
    assert rb.tasks_at_nll(curves[2]["tsv"][1], 3.15) == pytest.approx(0.6)
    assert rb.tasks_at_nll(curves[2]["esm"][1], 3.3) == pytest.approx(0.8)
    assert not any("task_arithmetic" in line for line in lines)
    rb.plot_strength_curves(run, ["esm", "tsv"], tmp_path / "by_T.png")
    assert (tmp_path / "by_T.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_merges_only_the_named_draws_and_auto_for_this_packages_methods(tmp_path, monkeypatch):
    """--draws restricts the subset stage to the named seeded subsets (a name not drawn is an
    error that lists what was), and --with-auto adds `alpha: auto` for this package's methods
    only; the report then has an "auto" row for that subset."""
    import eval.robustness as rb
    from eval.compare import Results

    run = object.__new__(rb.ZooRun)
    run.name, run.results, run.workdir = "toy", Results(tmp_path / "results.json"), tmp_path
    run.tasks = ["a", "b", "c"]
    merged = []
    monkeypatch.setattr(run, "merged", lambda key, method, setting, members, split: merged.append((key, setting)))
    run.protocol(["esm", "ties"], per_size=5, with_chosen=False, sizes={2}, with_auto=True, only={"a+c"},
                 in_task_proxy=True)
    assert merged == [
        (("subsets", "2", "a+c", "esm", rb.DEFAULT), rb.default_setting("esm")),
        (("subsets", "2", "a+c", "esm", "auto"), {"alpha": "auto"}),
        (("subsets", "2", "a+c", "esm", "in-task proxy"), {**rb.default_setting("esm"), "proxy": rb.IN_TASK}),
        (("subsets", "2", "a+c", "ties", rb.DEFAULT), rb.default_setting("ties")),
    ]
    merged.clear()
    run.protocol(["esm"], per_size=5, with_chosen=False, sizes={3}, only={"x+y"})  # another zoo's draw
    assert merged == []  # none of this zoo's is named, so none is merged (and none is an error)
    with pytest.raises(SystemExit, match=r"not drawn at these T: \['a\+b'\].*'a\+b\+c'"):
        run.protocol(["esm"], per_size=5, with_chosen=False, sizes={3}, only={"a+b"})

    score = lambda acc, quiz: {"tasks": {"a": acc, "c": acc}, "quiz": quiz, "nll": 3.0}
    for split in ("validation", "test"):
        run.results.put({"tasks": {}, "quiz": 0.8, "nll": 3.0}, "toy", "base", split)
        for t in "abc":
            run.results.put({"tasks": {t: 1.0}, "quiz": 0.5, "nll": 3.2}, "toy", "expert", t, split)
    run.results.put(score(0.5, 0.75), "toy", "subsets", "2", "a+c", "esm", rb.DEFAULT)
    run.results.put({**score(0.7, 0.7), "alpha": 4.2}, "toy", "subsets", "2", "a+c", "esm", "auto")
    text, curves = rb.summarize(rb.ZooScores("toy", run.results), ["esm"])
    assert "| 2 | 1 | esm | auto | 70.0 | 70.0 | 3.000 | – | 1/1 |" in text
    assert curves[("esm", "auto")] == [(2, 0.7, 0.7, 3.0)]


def test_share_by_size_counts_what_each_merge_keeps_of_its_experts():
    import torch

    from eval.scale_inflation import kept_shares, share_by_size_table

    torch.manual_seed(0)
    rows = 24  # three experts on disjoint output rows: task arithmetic keeps exactly each one
    deltas = {}
    for i, name in enumerate("abc"):
        d = torch.zeros(rows, 16, dtype=torch.float64)
        d[8 * i : 8 * (i + 1)] = torch.randn(8, 16, dtype=torch.float64)
        deltas[name] = d
    assert kept_shares(sum(deltas.values()), deltas) == pytest.approx([1.0, 1.0, 1.0])
    assert kept_shares(2 * deltas["a"], {"a": deltas["a"]}) == pytest.approx([2.0])
    table = share_by_size_table(deltas, dict.fromkeys(deltas, 0.0), "w").splitlines()
    cells = {int(line.split("|")[1]): [float(c) for c in line.split("|")[2:8]] for line in table if line[:3] in ("| 2", "| 3")}
    assert sorted(cells) == [2, 3]
    assert cells[2][0] == 3 and cells[3][0] == 1  # subsets of 2 and 3 out of 3
    for size, (subsets, rank, ta, tsv, esm, ratio) in cells.items():
        assert rank == min(rows, 16) // size  # ESM's default rank ⌊min(d_out, d_in)/T⌋
        assert ta == pytest.approx(1.0, abs=1e-3)
        assert 0 < tsv <= 1.0 + 1e-3 and esm > 0 and ratio == pytest.approx(esm / tsv, abs=0.01)


def test_alignment_table_reads_the_best_aligned_rank_and_cosines_of_known_spectra():
    """An expert with singular values (4, 2, 1, 0.1, 0.1, …) on 12 × 12: the whitened
    truncation's cosine Σs/(√j‖s‖) peaks at j = 2 (4/1, 6/√2 = 4.24, 7/√3 = 4.04: the third, 1, is
    below half the kept mean 3);
    a row per expert, cosines at the default rank ⌊12/T⌋ by hand."""
    import math

    import torch

    from eval.scale_inflation import alignment_table

    s = torch.tensor([4.0, 2.0, 1.0] + [0.1] * 9, dtype=torch.float64)
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    deltas = {"a": (q1 * s) @ q2.T}
    row = next(line for line in alignment_table(deltas, {"a": 0.0}, "w").splitlines() if line.startswith("| a |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    cosine = lambda j: float(s[:j].sum() / (math.sqrt(j) * s.norm()))  # noqa: E731
    assert int(cells[0]) == 2 and float(cells[1]) == pytest.approx(cosine(2), abs=0.005)
    assert [float(c) for c in cells[2:]] == pytest.approx([cosine(12 // t) for t in range(2, 7)], abs=0.005)


def test_update_size_against_the_sum_of_task_vectors():
    """Task arithmetic at weight 1/2 has half the sum's size on both measures, in every module
    type; an update twice the sum in one weight shows there, measured on the given inputs."""
    import torch

    from eval.update_size import by_module_type, size_against_sum

    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    base = {n: torch.randn(4, 6, generator=g) for n in names}
    experts = [{n: w + torch.randn(4, 6, generator=g) for n, w in base.items()} for _ in range(2)]
    moments = {n.removesuffix(".weight"): (lambda x: x.T @ x)(torch.randn(20, 6, generator=g, dtype=torch.float64)) for n in names}
    half = {n: base[n] + 0.5 * sum(e[n] - base[n] for e in experts) for n in names}
    types = by_module_type(size_against_sum(half, base, experts, moments))
    assert set(types) == {"down_proj", "q_proj"}
    for norm_ratio, output_ratio in types.values():
        assert abs(norm_ratio - 0.5) < 1e-5 and abs(output_ratio - 0.5) < 1e-5
    doubled = dict(half, **{names[2]: base[names[2]] + 2 * sum(e[names[2]] - base[names[2]] for e in experts)})
    rows = size_against_sum(doubled, base, experts, moments)
    assert abs(rows[names[2]]["output"] / rows[names[2]]["sum_output"] - 2) < 1e-5
