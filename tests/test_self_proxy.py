"""proxy: self (each expert samples its own calibration text) and chat-formatted proxy files."""

import json

import yaml

from eval.byte_tokenizer import byte_tokenizer
from mergekit_esm.calibration.proxy import load_documents, token_windows
from mergekit_esm.calibration.self_proxy import self_generated_windows
from tests.conftest import merge_in_process, recipe


def _generate(model, seed, temperature=1.0, mode="bos"):
    return self_generated_windows(str(model), byte_tokenizer(), 3, 40, temperature, mode, seed, "cpu")


def test_generation_is_deterministic_for_a_seed_and_fills_the_windows(zoo):
    first = _generate(zoo["experts"][0], seed=1)
    assert first == _generate(zoo["experts"][0], seed=1)
    assert first != _generate(zoo["experts"][0], seed=2)
    assert len(first) == 3 and all(len(w) == 40 for w in first)
    assert first[0][0] == byte_tokenizer().bos_token_id  # mode "bos" starts from BOS alone
    generic = _generate(zoo["experts"][0], seed=1, mode="generic")
    prompt = byte_tokenizer()("Write something you are good at.", add_special_tokens=False)["input_ids"]
    assert generic[0][1 : 1 + len(prompt)] == prompt


def _entries(cache, kind):
    folder = cache / kind
    return sorted(p.name for p in folder.iterdir() if (p / "complete").exists()) if folder.exists() else []


def test_self_proxy_end_to_end_with_cache_reuse_and_invalidation(zoo, tmp_path):
    params = {"proxy": "self", "proxy_samples": 2, "proxy_max_tokens": 64, "alpha": 1.0}
    config = recipe(tmp_path / "self.yml", zoo["base"], zoo["experts"], params)
    cache = tmp_path / "cache"
    first = merge_in_process(config, tmp_path / "out1", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ESM self-proxy" in first.stderr
    samples = _entries(cache, "self-proxy")
    assert len(samples) == len(zoo["experts"])
    card = (tmp_path / "out1" / "README.md").read_text()
    assert "| proxy | self |" in card

    again = merge_in_process(config, tmp_path / "out2", cache)
    assert again.returncode == 0 and "ESM self-proxy" not in again.stderr  # samples reused
    assert _entries(cache, "self-proxy") == samples

    hotter = yaml.safe_load(config.read_text())
    hotter["parameters"]["self_proxy_temperature"] = 0.5
    config.write_text(yaml.safe_dump(hotter))
    third = merge_in_process(config, tmp_path / "out3", cache)
    assert third.returncode == 0 and "ESM self-proxy" in third.stderr  # options changed: new samples
    assert len(_entries(cache, "self-proxy")) == 2 * len(zoo["experts"])


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def test_chat_jsonl_goes_through_the_chat_template(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    documents = load_documents(str(path))
    assert documents == [chat, "plain"]
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    (window,) = token_windows(documents, tok, samples=1, max_tokens=100)
    rendered = tok("<user>hi\n<assistant>hello\n", add_special_tokens=False)["input_ids"]
    assert window == rendered + [tok.eos_token_id] + tok("plain")["input_ids"] + [tok.eos_token_id]
    no_template = token_windows(documents[:1], byte_tokenizer(), samples=1, max_tokens=100)[0]
    assert no_template[:-1] == byte_tokenizer()("user: hi\nassistant: hello")["input_ids"]
