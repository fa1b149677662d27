"""Proxy text: where it comes from and how it becomes fixed-length token windows."""

import importlib.resources
import json
from pathlib import Path

from mergekit_esm.errors import EsmInputError

BUILTIN_PROXY = "builtin"


def _split_paragraphs(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def load_documents(source: str) -> list[str]:
    """Documents of a proxy source: 'builtin', a .txt (blank-line separated) or a .jsonl file."""
    if source == BUILTIN_PROXY:
        text = importlib.resources.files("mergekit_esm.data").joinpath("generic_proxy.txt")
        return _split_paragraphs(text.read_text(encoding="utf-8"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise EsmInputError(
            f"proxy file '{source}' does not exist: give a .txt or .jsonl path, or 'builtin'"
        )
    if path.suffix == ".txt":
        documents = _split_paragraphs(path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise EsmInputError(
                    f"proxy file '{source}' line {number}: expected a JSON object with a "
                    '"text" string, e.g. {"text": "..."}'
                ) from None
            if text.strip():
                documents.append(text)
    else:
        raise EsmInputError(
            f"proxy file '{source}' has an unknown type: use a .txt or .jsonl file, or 'builtin'"
        )
    if not documents:
        raise EsmInputError(f"proxy file '{source}' holds no text: add documents to it")
    return documents


def token_windows(
    documents: list[str], tokenizer, samples: int, max_tokens: int
) -> list[list[int]]:
    """Pack the documents (EOS-separated) into up to `samples` windows of `max_tokens` tokens.

    Packing uses every proxy token and needs no padding, so each window runs through the
    layers as one unmasked causal sequence.
    """
    stream: list[int] = []
    budget = samples * max_tokens
    for doc in documents:
        stream.extend(tokenizer(doc)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= budget:
            break
    windows = [stream[i : i + max_tokens] for i in range(0, min(len(stream), budget), max_tokens)]
    return [w for w in windows if len(w) >= 2]
