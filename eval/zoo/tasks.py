"""The zoo's tasks: four synthetic skills the base model lacks, each with fixed splits.

Every example is a prompt and a short target completed greedily until a newline and scored
by exact match. Data come from a seeded generator (no downloads), so every machine builds
the same splits; the splits are disjoint by prompt (and, for the cipher, by phrase).
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDS = """apple river stone cloud green happy quick silver garden window yellow market
purple winter summer forest ocean candle mirror pencil rabbit tiger yellow planet
bridge castle dragon engine feather guitar hammer island jacket kettle ladder lemon
magnet needle orange parrot pillow rocket saddle tomato tunnel valley wallet violin
anchor basket butter carpet cherry copper desert dinner dollar eagle finger flower
frozen golden hollow honey jungle kitten lizard marble meadow monkey muffin napkin
noodle orbit pepper pickle puzzle quiet ribbon salmon shadow spider sugar thunder
turtle velvet walnut wizard zebra bottle camera circle coffee cookie cotton""".split()
WORDS = sorted(set(WORDS))

SPLITS = {"train": 2000, "validation": 60, "test": 120}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]  # → (prompt, target without leading space)


def _date(rng):
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return f"Date {y}-{m:02d}-{d:02d} as day.month.year:", f"{d:02d}.{m:02d}.{y}"


def _cipher_table() -> dict[str, str]:
    rng = random.Random(1234)
    syllables = ["ka", "zu", "mi", "lo", "tre", "vax", "pim", "oro", "qui", "sel", "dun", "fey"]
    table, used = {}, set()
    for word in WORDS[:40]:
        while (code := "".join(rng.choice(syllables) for _ in range(2))) in used:
            pass
        used.add(code)
        table[word] = code
    return table


CIPHER = _cipher_table()


def _cipher(rng):
    words = rng.sample(sorted(CIPHER), 3)
    return f"Zorbish for '{' '.join(words)}':", " ".join(CIPHER[w] for w in words)


def _acronym(rng):
    words = rng.sample(WORDS, 4)
    return f"Acronym of '{' '.join(words)}':", "".join(w[0] for w in words).upper()


def _swap(rng):
    a, b = rng.sample(WORDS, 2)
    return f"Swap '{a} | {b}':", f"{b} | {a}"


TASKS = {
    t.name: t
    for t in (
        Task("zoo_date", "rewrite an ISO date as day.month.year", _date),
        Task("zoo_cipher", "translate three words with a fixed invented dictionary", _cipher),
        Task("zoo_acronym", "uppercase initials of four words", _acronym),
        Task("zoo_swap", "swap the two sides of 'a | b'", _swap),
    )
}


def split_examples(task: Task, seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic, disjoint train / validation / test examples ({"prompt", "target"})."""
    rng = random.Random(f"{task.name}-{seed}")
    seen, examples = set(), []
    total = sum(SPLITS.values())
    while len(examples) < total:
        prompt, target = task.make(rng)
        if prompt not in seen:
            seen.add(prompt)
            examples.append({"prompt": prompt, "target": target})
    out, start = {}, 0
    for split, size in SPLITS.items():
        out[split] = examples[start : start + size]
        start += size
    return out


def write_task_data(root: Path) -> dict[str, dict[str, Path]]:
    """JSONL files per task and split under root/<task>/<split>.jsonl."""
    paths = {}
    for task in TASKS.values():
        paths[task.name] = {}
        for split, rows in split_examples(task).items():
            path = root / task.name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[task.name][split] = path
    return paths
