"""Proxy text: where it comes from and how it becomes fixed-length token windows."""

import importlib.resources
import json
from pathlib import Path
from typing import Literal

from mergekit_esm.errors import EsmInputError

BUILTIN_PROXY = "builtin"
SELF_PROXY = "self"  # each expert writes its own text (calibration/self_proxy.py)
PromptMode = Literal["generic", "bos"]  # how self-written samples start

# Default proxy budget per expert (calibration's cost is proportional to it): enough tokens
# that the top-k eigenvectors of ΔW·XᵀX·ΔWᵀ are estimated from several tokens per direction
# (fewer than k tokens cannot span k directions at all), at least 8 windows and at most the
# paper's 32. On both zoos, 4 to 32 windows per expert scored the same (docs/performance.md).
TOKENS_PER_DIRECTION = 4
MIN_PROXY_WINDOWS, MAX_PROXY_WINDOWS = 8, 32


def default_window_count(max_rank: int, window_tokens: int) -> int:
    """Proxy windows per expert for the largest kept rank k: ⌈4k / window length⌉ in [8, 32]."""
    needed = -(-TOKENS_PER_DIRECTION * max_rank // window_tokens)
    return min(max(needed, MIN_PROXY_WINDOWS), MAX_PROXY_WINDOWS)


# A proxy document: plain text, or a chat ({"role", "content"} messages) that the tokenizer's
# chat template renders, so instruction-tuned experts see text shaped like their training data.
Document = str | list[dict]


def _split_paragraphs(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _jsonl_document(record) -> Document:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages") if isinstance(record, dict) else None
    if (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    ):
        return messages
    raise TypeError


def _is_empty(document: Document) -> bool:
    return not (document.strip() if isinstance(document, str) else any(m["content"].strip() for m in document))


def load_documents(source: str) -> list[Document]:
    """Documents of a proxy source: 'builtin', a .txt (blank-line separated) or a .jsonl file
    with {"text": ...} or chat {"messages": [{"role": ..., "content": ...}, ...]} lines."""
    if source == BUILTIN_PROXY:
        text = importlib.resources.files("mergekit_esm.data").joinpath("generic_proxy.txt")
        return _split_paragraphs(text.read_text(encoding="utf-8"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise EsmInputError(
            f"proxy file '{source}' does not exist: give a .txt or .jsonl path, 'builtin' or 'self'"
        )
    if path.suffix == ".txt":
        documents = _split_paragraphs(path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                document = _jsonl_document(json.loads(line))
            except (ValueError, TypeError):
                raise EsmInputError(
                    f"proxy file '{source}' line {number}: expected a JSON object with a "
                    '"text" string or a "messages" list, e.g. {"text": "..."} or '
                    '{"messages": [{"role": "user", "content": "..."}]}'
                ) from None
            if not _is_empty(document):
                documents.append(document)
    else:
        raise EsmInputError(
            f"proxy file '{source}' has an unknown type: use a .txt or .jsonl file, 'builtin' or 'self'"
        )
    if not documents:
        raise EsmInputError(f"proxy file '{source}' holds no text: add documents to it")
    return documents


def render(document: Document, tokenizer) -> list[int]:
    """Token ids of one document; chats go through the chat template (plain "role: content"
    lines when the tokenizer has none)."""
    if isinstance(document, str):
        return tokenizer(document)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(document, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in document))["input_ids"]


def pack_windows(sequences, eos_token_id: int | None, samples: int, max_tokens: int) -> list[list[int]]:
    """Pack token sequences (EOS-separated) into up to `samples` windows of `max_tokens`.

    Packing uses every proxy token and needs no padding, so each window runs through the
    layers as one unmasked causal sequence. `sequences` may be a lazy iterable: it is read
    only until the windows are full.
    """
    stream: list[int] = []
    budget = samples * max_tokens
    for ids in sequences:
        stream.extend(ids)
        if eos_token_id is not None and (not ids or ids[-1] != eos_token_id):
            stream.append(eos_token_id)
        if len(stream) >= budget:
            break
    windows = [stream[i : i + max_tokens] for i in range(0, min(len(stream), budget), max_tokens)]
    return [w for w in windows if len(w) >= 2]


def token_windows(documents: list[Document], tokenizer, samples: int, max_tokens: int) -> list[list[int]]:
    return pack_windows((render(d, tokenizer) for d in documents), tokenizer.eos_token_id, samples, max_tokens)
