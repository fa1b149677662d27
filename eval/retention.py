"""What a merge keeps of the base's own abilities, beside the experts' tasks.

Two measures, both on data that no expert and no proxy was trained or calibrated on:
- `heldout_nll`: mean next-token negative log-likelihood (nats) of held-out English prose
  (eval/data/heldout_prose.txt, written for this purpose; the built-in proxy covers other
  topics). Lower is better; the base sets the reference.
- the general-knowledge quiz (eval/data/general_quiz.jsonl, 80 short questions written for
  this purpose, split 40/40 into validation and test), asked through the base's chat template
  and scored with lm-eval: the reply counts if it gives the answer (or an alias) in its first
  line. The prompts are rendered once with the tokenizer's own template (as lm-eval's
  apply_chat_template would), so one lm-eval call scores the quiz beside tasks asked without it.

    python -m eval.retention MODEL_DIR [--split test]
"""

import argparse
import json
import math
import random
from pathlib import Path

import torch

from eval.score import score, write_task_configs

DATA = Path(__file__).with_name("data")
QUIZ = DATA / "general_quiz.jsonl"
PROSE = DATA / "heldout_prose.txt"
QUIZ_TASK = "general_quiz"


def quiz_splits() -> dict[str, list[dict]]:
    """The quiz's 80 questions, shuffled with a fixed seed into disjoint validation / test halves."""
    rows = [json.loads(line) for line in QUIZ.read_text().splitlines() if line.strip()]
    random.Random("general_quiz").shuffle(rows)
    half = len(rows) // 2
    return {"validation": rows[:half], "test": rows[half:]}


def write_quiz_task(out: Path, tokenizer) -> Path:
    """The quiz's data and lm-eval YAMLs (`general_quiz`, `general_quiz_val`) under out/, each
    question rendered through the tokenizer's chat template; returns the include path."""
    paths = {}
    for split, rows in quiz_splits().items():
        rows = [{**r, "prompt": render_chat(r["prompt"], tokenizer)} for r in rows]
        path = out / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = path
    return write_task_configs({QUIZ_TASK: paths}, out, scorer="answer_in_reply")


def render_chat(question: str, tokenizer) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def heldout_nll(model_dir: Path | str, text: str | None = None, window: int = 256, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of the text (default: the held-out prose), in windows of
    `window` tokens, each paragraph starting a new window (no context crosses a paragraph)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = PROSE.read_text() if text is None else text
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        ids = tokenizer(paragraph)["input_ids"] if paragraph else []
        windows += [ids[i : i + window] for i in range(0, len(ids) - 1, window - 1) if len(ids[i : i + window]) > 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        length = max(map(len, batch))
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for i, w in enumerate(batch):
            ids[i, : len(w)], mask[i, : len(w)] = torch.tensor(w), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total, count = total + float(losses), count + int((targets != -100).sum())
    if count == 0:
        raise ValueError("the held-out text has no token to predict")
    return total / count


def retention(model_dir: Path | str, include: Path, split: str = "test", batch_size: int = 32) -> dict[str, float]:
    """{"quiz": accuracy on the quiz split, "nll": held-out prose NLL} of one model.

    include: the folder `write_quiz_task` wrote."""
    task = QUIZ_TASK if split == "test" else QUIZ_TASK + "_val"
    quiz = score(model_dir, [task], include, batch_size=batch_size)[task]
    nll = heldout_nll(model_dir)
    if not math.isfinite(nll):
        nll = float("inf")
    return {"quiz": quiz, "nll": nll}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--workdir", type=Path, default=Path("eval/workdir"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    include = write_quiz_task(args.workdir / "retention", AutoTokenizer.from_pretrained(args.model))
    print(json.dumps(retention(args.model, include, args.split), indent=2))


if __name__ == "__main__":
    main()
