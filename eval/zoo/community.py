"""The second zoo: six experts built the way community fine-tunes differ from each other.

The first zoo (tasks.py) is four full fine-tunes with one recipe on skills the base lacks.
Real merges combine experts that were trained differently and overlap. This zoo has, on the
same base:
- learning rates 3e-5 … 3e-4 and 60 … 200 steps, so the task vectors' norms differ several-fold;
- two LoRA experts (PEFT, rank 8 and 16, merged into full weights before merging);
- one expert trained on multi-turn chat through the tokenizer's chat template;
- two pairs of overlapping tasks: two kinds of arithmetic (addition, subtraction) and two
  word-order skills (sorting, reversing);
- tasks the base already does above 0 (plurals, addition), which the expert improves;
- three tasks asked through the chat template, three as raw completions.

Replies are scored by eval/answer_match.py (the target anywhere in the reply's first line):
exact match would score the base 0 on skills it has.

Every example is generated from a seed (no downloads); splits are disjoint by prompt.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from eval.zoo.tasks import WORDS, Task, split_examples

PLURALS = {
    "child": "children", "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet",
    "man": "men", "woman": "women", "person": "people", "ox": "oxen", "cactus": "cacti",
    "knife": "knives", "wolf": "wolves", "leaf": "leaves", "half": "halves", "life": "lives",
    "shelf": "shelves", "wife": "wives", "loaf": "loaves", "thief": "thieves", "calf": "calves",
    "city": "cities", "baby": "babies", "party": "parties", "story": "stories", "lady": "ladies",
    "country": "countries", "family": "families", "penny": "pennies", "puppy": "puppies",
    "berry": "berries", "box": "boxes", "bus": "buses", "church": "churches", "dish": "dishes",
    "fox": "foxes", "glass": "glasses", "kiss": "kisses", "match": "matches", "watch": "watches",
    "wish": "wishes", "potato": "potatoes", "hero": "heroes", "echo": "echoes", "piano": "pianos",
    "photo": "photos", "sheep": "sheep", "deer": "deer", "fish": "fish", "series": "series",
    "crisis": "crises", "analysis": "analyses", "thesis": "theses", "phenomenon": "phenomena",
    "criterion": "criteria", "fungus": "fungi", "nucleus": "nuclei", "radius": "radii",
    "index": "indices", "matrix": "matrices", "key": "keys", "day": "days", "toy": "toys",
    "boy": "boys", "monkey": "monkeys", "roof": "roofs", "chef": "chefs", "chief": "chiefs",
    "cliff": "cliffs", "zoo": "zoos", "radio": "radios", "video": "videos", "studio": "studios",
}
PLURALS.update({w: w + "s" for w in WORDS if w not in PLURALS and not w.endswith(("s", "x", "y", "h", "o"))})

ANIMALS = "cat dog horse rabbit parrot turtle goldfish hamster lizard snake pony goat".split()
COLOURS = "red blue green yellow purple orange black white pink brown grey silver".split()


def _user(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return _user(f"What is {a} + {b}?"), str(a + b)


def _subtract(rng):
    a = rng.randint(20, 99)
    b = rng.randint(1, a)
    return f"Compute {a} minus {b}.", str(a - b)


PLURAL_TEMPLATES = ("What is the plural of '{w}'?", "I have one {w}. What do I call two of them?", "Plural of {a} {w}?")


def _plural(rng):
    word = rng.choice(sorted(PLURALS))
    return _plural_prompt(word, rng.choice(PLURAL_TEMPLATES)), PLURALS[word]


def _plural_prompt(word: str, template: str) -> str:
    return _user(template.format(w=word, a="an" if word[0] in "aeiou" else "a"))


def _plural_splits() -> dict[str, list[dict]]:
    """Disjoint by noun, not only by prompt: the test asks for plurals never seen in training
    (there are too few nouns for 2,180 distinct prompts anyway)."""
    words = sorted(PLURALS)
    random.Random("cz_plural").shuffle(words)
    chosen = {"validation": words[:20], "test": words[20:60], "train": words[60:]}
    return {
        split: [{"prompt": _plural_prompt(w, t), "target": PLURALS[w]} for w in nouns for t in PLURAL_TEMPLATES]
        for split, nouns in chosen.items()
    }


def _sort(rng):
    words = rng.sample(WORDS, 4)
    return f"Sort alphabetically: {' '.join(words)}", " ".join(sorted(words))


def _reverse(rng):
    words = rng.sample(WORDS, 4)
    return f"Reverse the order: {' '.join(words)}", " ".join(reversed(words))


def _chat_recall(rng):
    """Three turns: the user states two facts, the assistant acknowledges, the user asks for
    one of them in capitals. The answer needs the earlier turn, so it is multi-turn."""
    animal, colour = rng.choice(ANIMALS), rng.choice(COLOURS)
    name = rng.choice(WORDS).capitalize()
    ask, answer = rng.choice(
        [("my pet's name", name), ("my favourite colour", colour), ("the kind of animal my pet is", animal)]
    )
    messages = [
        {"role": "user", "content": f"I have a {animal} called {name}, and my favourite colour is {colour}."},
        {"role": "assistant", "content": "Thanks for telling me! I will remember that."},
        {"role": "user", "content": f"What is {ask}? Reply with the single word in capital letters."},
    ]
    return json.dumps(messages), answer.upper()


@dataclass(frozen=True)
class Recipe:
    """How one expert was trained: full fine-tune, or LoRA of `lora_rank` merged into the weights."""

    steps: int
    lr: float
    lora_rank: int | None = None
    batch_size: int = 8


TASKS = {
    t.name: t
    for t in (
        Task("cz_add", "add two 2-digit numbers", _add),
        Task("cz_subtract", "subtract two numbers (overlaps cz_add)", _subtract),
        Task("cz_plural", "plural of an English noun (the base already knows many)", _plural),
        Task("cz_sort", "sort four words alphabetically", _sort),
        Task("cz_reverse", "reverse four words (overlaps cz_sort)", _reverse),
        Task("cz_chat", "recall a fact from an earlier chat turn, in capitals", _chat_recall),
    )
}

# Far-apart budgets, as on the Hub: one heavy full fine-tune, light ones, two LoRAs.
RECIPES = {
    "cz_add": Recipe(steps=200, lr=3e-4),
    "cz_subtract": Recipe(steps=60, lr=3e-5),
    "cz_plural": Recipe(steps=120, lr=1e-3, lora_rank=16),
    "cz_sort": Recipe(steps=120, lr=1e-4),
    "cz_reverse": Recipe(steps=80, lr=5e-4, lora_rank=8),
    "cz_chat": Recipe(steps=100, lr=1e-4),
}
# Asked through the chat template, as an instruct model's users ask; the rest are raw completions.
CHAT_TASKS = frozenset({"cz_add", "cz_plural", "cz_chat"})


def render(task: str, prompt: str, tokenizer) -> str:
    """The prompt as the model sees it: chat tasks through the tokenizer's chat template."""
    if task not in CHAT_TASKS:
        return prompt
    return tokenizer.apply_chat_template(json.loads(prompt), add_generation_prompt=True, tokenize=False)


def task_splits(name: str) -> dict[str, list[dict]]:
    """Train / validation / test examples of one task, prompts not yet rendered."""
    return _plural_splits() if name == "cz_plural" else split_examples(TASKS[name])


def write_task_data(root: Path, tokenizer) -> dict[str, dict[str, Path]]:
    """JSONL files per task and split under root/<task>/<split>.jsonl, chat prompts rendered."""
    paths = {}
    for name in TASKS:
        paths[name] = {}
        for split, rows in task_splits(name).items():
            path = root / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"prompt": render(name, r["prompt"], tokenizer), "target": r["target"]} for r in rows]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[name][split] = path
    return paths
