"""The architecture matrix: each decoder architecture mergekit-esm supports, merged by the
stock `mergekit-yaml` entry point with every method and compared on every tensor with the
in-memory references (whose ESM activations come from transformers' whole-model forward);
and the layouts it refuses, refused in preflight with one line.

The merges run in this process through mergekit's own click command (what the
`mergekit-yaml` script calls): a subprocess would add ~7 s of imports to each of 48 merges.
"""

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.common import ModelReference
from mergekit.scripts.run_yaml import main as mergekit_yaml_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_esm import architecture, weights
from mergekit_esm.architecture import DecoderLayout
from mergekit_esm.calibration.layerwise import layer_input_moments
from mergekit_esm.errors import EsmInputError
from mergekit_esm.integration.preflight import _routed_share
from mergekit_esm.methods.esm import EsmSettings
from mergekit_esm.strength.auto import model_token_losses
from tests import reference_svd_family
from tests.conftest import PROXY_TEXT
from tests.reference_esm import capture_inputs, esm_merge, packed_windows, reference_settings
from tests.tiny_models import ARCHITECTURES, UNSUPPORTED, architecture_config, write_zoo

METHODS = ("esm", "tsv", "iso_c", "iso_cts")
# 64-token windows: 4× the sliding windows; float64, the precision of the references
PROXY = {"proxy_samples": 4, "proxy_max_tokens": 64, "precision": "float64"}


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _merge(tmp, zoo, method: str, parameters: dict):
    config = tmp / f"{method}.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(zoo["base"]),
                "models": [{"model": str(e)} for e in zoo["experts"]],
                "parameters": {"cache_dir": str(tmp / "cache"), **parameters},
                "dtype": "float32",
            }
        )
    )
    return CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp / method)])


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_zoo(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base, experts = write_zoo(root, config=architecture_config(request.param))
    (root / "proxy.txt").write_text(PROXY_TEXT)
    return {"name": request.param, "root": root, "base": base, "experts": experts}


def _expected(zoo, method: str) -> dict[str, torch.Tensor]:
    if method == "esm":
        tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
        windows = packed_windows(PROXY_TEXT.split("\n\n"), tokenizer, **{"samples": 4, "max_tokens": 64})
        defaults = EsmSettings()
        return esm_merge(zoo["base"], zoo["experts"], windows, **reference_settings(defaults))
    experts = [_state(e) for e in zoo["experts"]]
    config = AutoModelForCausalLM.from_pretrained(zoo["base"]).config
    return reference_svd_family.svd_family_merge(method, _state(zoo["base"]), experts, alpha=1.3, fraction=0.5, config=config)


@pytest.mark.parametrize("method", METHODS)
def test_architecture_merges_like_the_reference(arch_zoo, method, tmp_path):
    parameters = {
        "esm": {**PROXY, "proxy": str(arch_zoo["root"] / "proxy.txt")},
        "iso_cts": {"alpha": 1.3, "common_space_fraction": 0.5},
    }.get(method, {"alpha": 1.3})
    result = _merge(tmp_path, arch_zoo, method, parameters)
    assert result.exit_code == 0, result.output[-3000:]
    got = _state(tmp_path / method)
    _compare(got, _expected(arch_zoo, method), f"{arch_zoo['name']} {method}")
    base = _state(arch_zoo["base"])
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.experts.down_proj"):
        if name in got:  # a dense MLP or stacked expert MLPs
            assert (got[name] - base[name]).abs().max() > 1e-3  # merged, not the base passed through


def _compare(got: dict, expected: dict, label: str) -> None:
    assert got.keys() == expected.keys()
    errors = {name: (got[name] - expected[name]).abs().max().item() for name in expected}
    worst = max(errors, key=errors.get)
    median = sorted(errors.values())[len(errors) // 2]
    print(f"\n{label}: max {errors[worst]:.2e} ({worst}), median {median:.2e}")
    assert errors[worst] <= 1e-4, (worst, errors[worst])
    assert median <= 1e-6


def test_an_expert_mlp_given_fewer_tokens_than_its_rank_takes_its_svd_basis(tmp_path):
    """Mixtral calibrated on one 32-token window: 2 of 4 expert MLPs per token leave each
    about 16 tokens, fewer than gate/up_proj's rank 21 (64 rows / 3 experts) for most and
    more than down_proj's 10 for most. Where a model's router sent an expert MLP fewer tokens
    than k, that model's factors for it come from ΔW's SVD; the merge says so, and matches the
    reference, which gives those models isotropic inputs (XᵀX = I) instead of their tokens."""
    base, experts = write_zoo(tmp_path / "zoo", config=architecture_config("mixtral"))
    (tmp_path / "proxy.txt").write_text(PROXY_TEXT)
    proxy = {**PROXY, "proxy_samples": 1, "proxy_max_tokens": 32, "proxy": str(tmp_path / "proxy.txt")}
    result = _merge(tmp_path, {"base": base, "experts": experts}, "esm", proxy)
    assert result.exit_code == 0, result.output[-3000:]
    assert "got fewer proxy tokens than their rank from some model" in result.output
    tokenizer = AutoTokenizer.from_pretrained(base)
    windows = packed_windows(PROXY_TEXT.split("\n\n"), tokenizer, samples=1, max_tokens=32)
    routed = [
        {key: x.shape[0] for key, x in capture_inputs(AutoModelForCausalLM.from_pretrained(e), windows).items() if ":" in key}
        for e in experts
    ]
    gate_up = [n for counts in routed for key, n in counts.items() if "gate_up_proj" in key]
    assert min(gate_up) < 21 <= max(gate_up)  # both rules take part
    defaults = EsmSettings()
    expected = esm_merge(base, experts, windows, **reference_settings(defaults))
    _compare(_state(tmp_path / "esm"), expected, "mixtral esm, under-sampled experts")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_layout_is_refused_in_preflight(name, tmp_path):
    """Mixture-of-experts layers: one `Error:` line naming the layout, nothing written, before
    any tensor is read."""
    base, experts = write_zoo(tmp_path / "zoo", n_experts=2, config=architecture_config(name))
    result = _merge(tmp_path, {"base": base, "experts": experts}, "esm", PROXY)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output[-2000:]
    assert "mixture-of-experts layer model.layers.0.mlp.experts" in errors[0] and "does not merge yet" in errors[0]
    assert not (tmp_path / "esm").exists() and not (tmp_path / "cache").exists()


def test_calibration_stops_when_the_experts_forward_hides_the_routed_tokens(monkeypatch):
    """Calibration reads each expert's inputs off the eager experts forward's F.linear calls;
    a forward that applies the experts otherwise (here transformers' grouped_mm kernel) must
    stop it rather than leave the experts without statistics."""
    config = architecture_config("mixtral")
    state = AutoModelForCausalLM.from_config(config).state_dict()
    eager = architecture.build_meta_model

    def grouped(config):
        model = eager(config)
        model.set_experts_implementation("grouped_mm")
        return model

    monkeypatch.setattr(architecture, "build_meta_model", grouped)
    with pytest.raises(EsmInputError, match="calibration saw 0 routed tokens reach model.layers.0.mlp.experts"):
        next(layer_input_moments(state.__getitem__, DecoderLayout(config), [list(range(3, 35))]))


def test_stacked_experts_are_read_as_transformers_loads_them_converted_once(tmp_path, monkeypatch):
    """The checkpoint stores each expert's w1/w2/w3; the reader stacks them by transformers'
    conversion mapping (as mergekit's loader does) into what transformers loads, and the E expert
    MLPs of a stacked tensor, read in turn, share one conversion."""
    base, _ = write_zoo(tmp_path, n_experts=0, config=architecture_config("mixtral"))
    loaded = AutoModelForCausalLM.from_pretrained(base).state_dict()
    converted = []
    convert = weights.convert_checkpoint_tensors
    monkeypatch.setattr(weights, "convert_checkpoint_tensors", lambda *args: converted.append(args[2]) or convert(*args))
    read = weights.checked_reader(ModelReference.parse(str(base)), "cpu")
    stacked, router = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.gate.weight"
    for _ in range(4):
        assert torch.equal(read(stacked), loaded[stacked])
    assert torch.equal(read(router), loaded[router])  # block_sparse_moe.gate on disk
    assert converted == [stacked, router]


def test_default_proxy_aims_at_each_expert_mlps_routed_share():
    """Mixtral routes each token to 2 of its 4 expert MLPs: each expects half the proxy tokens."""
    layout = DecoderLayout(architecture_config("mixtral"))
    share = _routed_share(layout)
    assert len(share) == 3 * 4 * 3 and set(share.values()) == {0.5}  # layers × experts × gate/up/down


@pytest.mark.parametrize("method", ["regmean", "regmean_plus_plus"])
def test_regmean_refuses_mixture_of_experts_in_preflight(method, tmp_path):
    """An expert MLP that no proxy token reaches has no input Gram for RegMean to weigh by."""
    base, experts = write_zoo(tmp_path / "zoo", n_experts=2, config=architecture_config("mixtral"))
    result = _merge(tmp_path, {"base": base, "experts": experts}, method, PROXY)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert f"{method} does not merge mixture-of-experts layers yet" in errors[0]
    assert not (tmp_path / method).exists() and not (tmp_path / "cache").exists()


def test_a_checkpoint_mergekit_cannot_plan_is_refused_in_preflight(tmp_path):
    """Command R without q/k norms: mergekit 0.1.5's cohere template requires them, and would
    stop after the pre-pass had run. The preflight says so first."""
    config = architecture_config("cohere")
    config.use_qk_norm = False
    base, experts = write_zoo(tmp_path / "zoo", n_experts=2, config=config)
    result = _merge(tmp_path, {"base": base, "experts": experts}, "tsv", {})
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.output[-2000:]
    assert "requires tensor model.layers.0.self_attn.q_norm.weight" in errors[0]
    assert not (tmp_path / "tsv").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_layer_by_layer_losses_match_the_whole_model(name):
    """alpha: auto scores merges by token losses computed layer by layer: they must be the
    transformers model's own (Gemma 2's logit soft-capping, Granite's logit scaling, Cohere's
    logit scale included)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(name)).eval()
    state = model.state_dict()
    windows = [list(range(3, 43)), list(range(100, 140))]
    with torch.no_grad():
        logits = [model(torch.tensor([w])).logits[0, :-1] for w in windows]
    expected = torch.cat([torch.nn.functional.cross_entropy(l, torch.tensor(w[1:]), reduction="none") for l, w in zip(logits, windows)])
    got = model_token_losses(state.__getitem__, DecoderLayout(model.config), windows)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
