"""Scoring a reply by whether it gives the answer anywhere in its first line.

Used by the second zoo's tasks and the general-knowledge quiz, where an instruct model
answers in sentences ("The plural of 'baby' is 'babies'."): exact match would score it 0
on skills it has. lm-eval calls `process_results` from the task YAMLs (`!function`), which
it imports from the YAML's own folder, so eval/score.py copies this file there.
"""

import re


def answer_in_reply(reply: str, answers: list[str]) -> bool:
    """One of the answers as a whole word or phrase in the reply's first non-empty line, any case."""
    line = next((l for l in reply.strip().splitlines() if l.strip()), "")
    return any(re.search(rf"(?<!\w){re.escape(a.strip())}(?!\w)", line, re.IGNORECASE) for a in answers)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    answers = [doc["target"], *doc.get("aliases", [])]
    return {"answer_in_reply": float(answer_in_reply(results[0], answers))}
