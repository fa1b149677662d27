"""Calibration: proxy handling and the layer-by-layer moments against a full-model forward."""

import functools
import json
from pathlib import Path

import pytest
import yaml
import torch
from mergekit.common import ModelReference
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from eval.byte_tokenizer import byte_tokenizer
from mergekit_esm.algebra.subspace import add_gram_upper_, fill_lower_from_upper_
from mergekit_esm.architecture import DecoderLayout
from mergekit_esm.calibration import layerwise
from mergekit_esm.calibration.layerwise import held_form, layer_input_moments
from mergekit_esm.calibration.proxy import default_window_count, load_documents, token_windows
from mergekit_esm.errors import EsmInputError
from mergekit_esm.weights import checked_reader
from tests.tiny_models import tiny_config, write_model


def test_builtin_proxy_is_large_enough_for_default_settings():
    docs = load_documents("builtin")
    assert len(docs) > 100
    windows = token_windows(docs, byte_tokenizer(), samples=32, max_tokens=512)
    assert len(windows) == 32 and all(len(w) == 512 for w in windows)


@pytest.mark.parametrize(
    "rank, window, expected",
    [(256, 512, 8), (1024, 512, 8), (1025, 512, 9), (3584, 512, 28), (7168, 512, 32), (100, 16, 25)],
)
def test_default_proxy_budget_gives_four_tokens_per_direction_within_8_to_32_windows(rank, window, expected):
    assert default_window_count(rank, window) == expected
    count = default_window_count(rank, window)
    assert count * window >= 4 * rank or count == 32


def test_preflight_fills_in_the_default_proxy_budget_from_the_largest_rank(zoo, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_esm.integration.preflight import preflight
    from tests.conftest import recipe

    config = recipe(tmp_path / "r.yml", zoo["base"], zoo["experts"], {"proxy": str(zoo["proxy"])})
    raw = yaml.safe_load(config.read_text())
    del raw["parameters"]["proxy_samples"]
    inputs = preflight(MergeConfiguration.model_validate(raw), MergeOptions())
    assert inputs.settings.proxy_samples == default_window_count(max(inputs.ranks.values()), 64)
    raw["parameters"]["proxy_samples"] = 3  # a user's choice is kept
    assert preflight(MergeConfiguration.model_validate(raw), MergeOptions()).settings.proxy_samples == 3


def test_windows_pack_documents_with_eos_and_respect_the_budget():
    tok = byte_tokenizer()
    windows = token_windows(["ab", "cd"], tok, samples=10, max_tokens=3)
    flat = [i for w in windows for i in w]
    assert flat == tok("ab")["input_ids"] + [tok.eos_token_id] + tok("cd")["input_ids"] + [tok.eos_token_id]
    assert all(len(w) <= 3 for w in windows)
    assert len(token_windows(["x" * 100], tok, samples=2, max_tokens=8)) == 2


def test_proxy_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_documents(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert load_documents(str(tmp_path / "b.jsonl")) == ["hello", "x"]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    (tmp_path / "c.csv").write_text("a,b\n")
    for name, message in [
        ("empty.txt", "holds no text"),
        ("bad.jsonl", "line 1"),
        ("c.csv", "unknown type"),
        ("missing.txt", "does not exist"),
    ]:
        with pytest.raises(EsmInputError, match=message):
            load_documents(str(tmp_path / name))


@pytest.mark.parametrize("block", [1, 3, 4, 10, 512])
def test_upper_block_sums_mirrored_equal_the_full_gram_matrix(block):
    """XᵀX summed window by window on and above the diagonal only, then mirrored: equal to
    the full product, exactly symmetric, for block widths that do and do not divide d = 10."""
    g = torch.Generator().manual_seed(0)
    windows = [torch.randn(rows, 10, generator=g, dtype=torch.float64) for rows in (7, 1, 12)]
    gram = torch.zeros(10, 10, dtype=torch.float64)
    for x in windows:
        add_gram_upper_(gram, x, block)
    fill_lower_from_upper_(gram, block)
    x = torch.cat(windows)
    assert torch.allclose(gram, x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("sum_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("windows", [[list(range(5, 45)), list(range(60, 90))], [list(range(5, 45)), list(range(60, 68))]])
def test_layerwise_moments_equal_full_model_forward(tmp_path, monkeypatch, windows, sum_dtype, with_base):
    """70 tokens: XᵀX for every input (hidden 32, intermediate 64); 48 tokens: down_proj's
    64-wide input is held as X instead, the smaller of the two. Given the base's weights,
    down_proj, the only reader of its input, holds ΔW XᵀX ΔWᵀ (32², smaller than both) at
    either length. Sums in float64 (CPU default) or float32 (GPU default), in column blocks
    narrower than the inputs (as the default blocks are for real widths) so that the
    mirrored lower blocks are checked too."""
    monkeypatch.setattr(layerwise, "add_gram_upper_", functools.partial(add_gram_upper_, block=12))
    monkeypatch.setattr(layerwise, "fill_lower_from_upper_", functools.partial(fill_lower_from_upper_, block=12))
    config = tiny_config(layers=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(tmp_path / "model.safetensors")
    base = {name: w + 0.01 * torch.randn_like(w) for name, w in state.items()}
    layout = DecoderLayout(config)
    n = sum(map(len, windows))

    expected = {}

    def hook(name):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            expected[name] = expected.get(name, 0) + x.T @ x

        return fn

    for t in layout.targets:
        model.get_submodule(t.name.removesuffix(".weight")).register_forward_pre_hook(hook(t.name))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))

    seen = 0
    read_base = base.__getitem__ if with_base else None
    for result in layer_input_moments(state.__getitem__, layout, windows, sum_dtype=sum_dtype, read_base=read_base):
        for t in layout.layer_targets(result.layer):
            inputs = result.moments[t.input_group]
            assert inputs.n_tokens == n
            delta = (state[t.name] - base[t.name]).double()
            shift = delta @ expected[t.name] @ delta.T
            assert torch.allclose(inputs.output_covariance(delta), shift, rtol=1e-4, atol=1e-6), t.name
            if with_base and t.module_type == "down_proj":
                # kept in the sums' dtype: rounded to float32 it would blur S's small eigenvalues
                assert inputs.shift is not None and inputs.shift.shape == (32, 32) and inputs.shift.dtype == sum_dtype
                with pytest.raises(ValueError, match="no factor"):
                    inputs.factor(torch.float64)
                continue
            assert (inputs.tokens is not None) == (n < t.shape[1]), t.name  # the smaller form
            x = inputs.factor(torch.float64)
            assert x.shape == (min(n, t.shape[1]), t.shape[1])
            assert torch.allclose(x.T @ x, expected[t.name], rtol=1e-4, atol=1e-4), t.name
            seen += 1
    assert seen == len(layout.targets) - 3 * with_base == 21 - 3 * with_base


def test_held_form_is_the_smallest():
    assert held_form(100, 64) == "moment" and held_form(48, 64) == "tokens"
    assert held_form(100, 64, 32) == "shift" and held_form(16, 64, 32) == "tokens"
    assert held_form(100, 32, 64) == "moment"  # a wide output: XᵀX is smaller
    # by bytes: X and XᵀX in float32, the shift moment in the sums' dtype
    assert held_form(100, 64, 40, shift_bytes=8) == "shift" and held_form(100, 64, 48, shift_bytes=8) == "moment"


def test_architecture_without_target_linears_is_refused():
    from transformers import GPT2Config

    with pytest.raises(EsmInputError, match="lacks ESM's target linears"):
        DecoderLayout(GPT2Config(n_layer=1, n_embd=16, n_head=2)).targets


def test_large_allocations_are_mapped_unless_the_user_chose(monkeypatch):
    import platform

    from mergekit_esm.integration.heap import map_large_allocations

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_allocations() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert map_large_allocations() is (platform.libc_ver()[0] == "glibc")


def _anonymous_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_trim_heap_returns_free_pages_inside_the_heap():
    """Free 64 KiB blocks between live ones (a fragmented heap): glibc keeps their pages until
    trim_heap hands them back."""
    import platform

    from mergekit_esm.integration.heap import trim_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 4096 × 64 KiB = 256 MiB, below mmap's threshold
    kept = blocks[::16]
    del blocks
    before = _anonymous_mib()
    assert trim_heap()
    assert before - _anonymous_mib() > 100, "the freed blocks' pages stayed in the heap"
    del kept


def test_reading_an_input_weight_leaves_no_shard_mapped(tmp_path):
    """The pre-pass reads a layer of each of the T+1 models: a shard left mapped after the read
    would keep its pages in RSS (mergekit's loader keeps each model's last shard open)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps")
    config = tiny_config(layers=2)
    path = write_model(tmp_path / "model", LlamaForCausalLM(config).state_dict(), config)
    read = checked_reader(ModelReference.parse(str(path)), "cpu")
    weight = read("model.layers.1.mlp.down_proj.weight").double()  # callers keep a copy
    assert weight.shape == (config.hidden_size, config.intermediate_size)
    assert str(path) not in maps.read_text()


def test_a_pytorch_bin_shard_is_loaded_once_not_per_weight(tmp_path, monkeypatch):
    """mergekit loads a .bin shard whole when it opens it: closing it after each read, as the
    pre-pass does for safetensors, would load the whole shard again for every weight."""
    config = tiny_config(layers=2)
    path = tmp_path / "model"
    path.mkdir()
    config.save_pretrained(path)
    torch.save(LlamaForCausalLM(config).state_dict(), path / "pytorch_model.bin")
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    read = checked_reader(ModelReference.parse(str(path)), "cpu")
    read("model.layers.0.mlp.down_proj.weight")
    opened = len(loads)  # mergekit's index and the shard itself
    read("model.layers.1.mlp.down_proj.weight")
    assert len(loads) == opened
