"""Fine-tuning of one expert per zoo task (cached, resumable, with a progress bar).

Full fine-tuning, or LoRA (PEFT) on every attention and MLP linear, merged into full
weights at the end, as LoRA experts are published merged. Loss on the target tokens only;
fixed seed, order and schedule, so a rebuild gives the same expert on the same machine. A
checkpoint (trainable weights + optimizer) is kept every `checkpoint_every` steps in
<expert>.partial/ and a killed build resumes from it.
"""

import json
import random
import shutil
from pathlib import Path

import torch
import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def _batches(tokenizer, rows, batch_size, steps, seed):
    rng = random.Random(seed)
    order = []
    while len(order) < steps * batch_size:
        chunk = list(range(len(rows)))
        rng.shuffle(chunk)
        order += chunk
    for step in range(steps):
        batch = [rows[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        answers = [tokenizer(" " + r["target"] + "\n")["input_ids"] for r in batch]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(batch), length), tokenizer.eos_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            labels[i, len(p) : n] = torch.tensor(a)
            mask[i, :n] = 1
        yield ids, mask, labels


def finetune(
    base: Path,
    rows: list[dict],
    out: Path,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    checkpoint_every: int = 50,
    device: str = "cpu",
    lora_rank: int | None = None,
) -> Path:
    """Train on `rows` ({"prompt", "target"}, prompts as the model sees them); write to `out`."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    partial = out.with_name(out.name + ".partial")
    start = 0
    resume = (partial / "state.json").exists()
    if resume:
        start = json.loads((partial / "state.json").read_text())["step"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(partial if resume and not lora_rank else base, dtype=torch.float32)
    if lora_rank:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume:
            model = PeftModel.from_pretrained(model, partial, is_trainable=True)
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            model = get_peft_model(model, config)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / (steps - warmup + 1))
    )
    if start:
        saved = torch.load(partial / "optimizer.pt", map_location=device)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
    batches = _batches(tokenizer, rows, batch_size, steps, seed)
    progress = tqdm.tqdm(total=steps, initial=start, desc=f"fine-tune {out.name}")
    for step, (ids, mask, labels) in enumerate(batches):
        if step < start:
            continue
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % checkpoint_every == 0 and done < steps:
            model.save_pretrained(partial)
            torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, partial / "optimizer.pt")
            (partial / "state.json").write_text(json.dumps({"step": done}))
    progress.close()
    if lora_rank:
        model = model.merge_and_unload()
    scratch = out.with_name(out.name + ".writing")
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    scratch.rename(out)
    if partial.exists():
        shutil.rmtree(partial)
    return out
