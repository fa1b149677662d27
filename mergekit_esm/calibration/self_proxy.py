"""`proxy: self` — calibration text that each expert writes itself.

Hobbyists merging Hub models rarely have the experts' training data, and on LLM experts the
proxy's domain matters (docs/zoo_studies.md, "Proxy text"). Sampling from the expert gives text from the
distribution it was fine-tuned towards, at the cost of one generation run per expert.

The model is loaded by transformers with accelerate's `device_map="auto"`: layers that do not
fit the device (or RAM) are offloaded to CPU and then disk (`offload_folder`) and streamed in
for each forward step, so a model larger than memory still generates, only slower (every new
token reads the offloaded layers once more).
"""

from collections.abc import Iterator

import psutil
import torch
import tqdm
from transformers import AutoModelForCausalLM

from mergekit_esm.cache import process_temporary_directory
from mergekit_esm.calibration.proxy import PromptMode, pack_windows

# Short open requests, one per sequence in turn: they let an instruction-tuned expert answer
# in its own manner without steering it to any domain.
GENERIC_PROMPTS = (
    "Write something you are good at.",
    "Tell me about a topic you know well.",
    "Give an example of a task you can do, and do it.",
    "Answer a question of your choice.",
    "Continue the text: ",
    "Explain something step by step.",
    "Write a short example.",
    "Show what you have learned.",
)


def prompt_ids(tokenizer, mode: PromptMode) -> list[list[int]]:
    """Token ids that start each sampled sequence.

    generic: the prompts above, through the chat template when the tokenizer has one;
    bos: the beginning-of-sequence token alone (the model's unconditional distribution).
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [tokenizer.eos_token_id]
    if mode == "bos":
        return [bos]
    if getattr(tokenizer, "chat_template", None):
        chats = [[{"role": "user", "content": p}] for p in GENERIC_PROMPTS]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in GENERIC_PROMPTS]


@torch.inference_mode()
def generate_sequences(
    model, tokenizer, prompts: list[list[int]], batch_size: int, max_tokens: int, temperature: float, seed: int
) -> Iterator[list[int]]:
    """Endless seeded samples (prompt + continuation, cut after the first EOS), in batches."""
    device = model.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    batch_index = 0
    while True:
        batch = [prompts[(batch_index * batch_size + i) % len(prompts)] for i in range(batch_size)]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        torch.manual_seed(seed + batch_index)  # same samples for the same seed
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max(1, max_tokens - width),
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row, prompt in zip(out.tolist(), batch):
            continuation = row[width:]
            if eos in continuation:
                continuation = continuation[: continuation.index(eos) + 1]
            yield prompt + continuation
        batch_index += 1


def _memory_budget(device: str) -> dict:
    """What accelerate may fill before it offloads to disk: most of the free RAM, and the
    whole of the merge's GPU when there is one (the merge itself has not started yet)."""
    budget = {"cpu": int(psutil.virtual_memory().available * 0.8)}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        budget[index] = int(torch.cuda.mem_get_info(index)[0] * 0.9)
    return budget


def self_generated_windows(
    model_path: str,
    tokenizer,
    samples: int,
    max_tokens: int,
    temperature: float,
    mode: PromptMode,
    seed: int,
    device: str,
    trust_remote_code: bool = False,
) -> list[list[int]]:
    """`samples` windows of `max_tokens` tokens sampled from the model, packed like text."""
    with process_temporary_directory("offload") as offload:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype="auto",
            device_map="auto",
            max_memory=_memory_budget(device),
            offload_folder=offload,
            trust_remote_code=trust_remote_code,
        ).eval()
        sequences = generate_sequences(
            model, tokenizer, prompt_ids(tokenizer, mode), min(samples, 32), max_tokens, temperature, seed
        )
        budget = samples * max_tokens
        progress = tqdm.tqdm(total=budget, desc=f"ESM self-proxy {model_path}", unit="tok")

        def counted():
            for s in sequences:
                progress.update(min(len(s), budget - progress.n))
                yield s

        windows = pack_windows(counted(), tokenizer.eos_token_id, samples, max_tokens)
        progress.close()
        del model
    return windows
