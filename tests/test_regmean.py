"""regmean and regmean_plus_plus through the real `mergekit-yaml` on the tiny zoo, against
tests/reference_regmean.py (dense, float64, from the papers' formulas)."""

import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_esm.methods.regmean import RegMeanSettings
from mergekit_esm.methods.regmean_plus_plus import RegMeanPlusPlusSettings
from tests.conftest import PROXY_TEXT, merge_in_process, recipe
from tests.reference_esm import capture_inputs, packed_windows
from tests.reference_regmean import regmean_merge, regmean_plus_plus_merge


@pytest.fixture(scope="module")
def windows(zoo):
    # what recipe() asks of calibrated methods: 4 windows of 64 tokens of the proxy text
    return packed_windows(PROXY_TEXT.split("\n\n"), AutoTokenizer.from_pretrained(zoo["base"]), samples=4, max_tokens=64)


def _merge(zoo, tmp_path, method, parameters, experts=None):
    config = recipe(
        tmp_path / f"{method}.yml", zoo["base"], experts or zoo["experts"], {"proxy": str(zoo["proxy"]), **parameters}, merge_method=method
    )
    result = merge_in_process(config, tmp_path / "out", tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{method} calibrating and merging" in result.stderr
    return {k: v.double() for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict().items()}


def _errors(got, expected):
    return {name: (got[name] - expected[name]).abs().max().item() for name in expected}


def test_regmean_matches_the_papers_formula(zoo, tmp_path, windows):
    ratio = RegMeanSettings().non_diagonal_ratio
    got = _merge(zoo, tmp_path, "regmean", {"alpha": 1.3})
    expected = regmean_merge(zoo["base"], zoo["experts"], windows, ratio, alpha=1.3)
    errors = _errors(got, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])  # measured 6e-8 (α = 1: the float32 output)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## regmean settings" in card and f"| non_diagonal_ratio | {ratio} |" in card and "| alpha | 1.3 |" in card


def test_regmean_without_off_diagonal_is_the_gram_diagonal_weighted_average(zoo, tmp_path, windows):
    """non_diagonal_ratio 0: column j of W is Σ_t g_tj W_t[:, j] / Σ_t g_tj, g_tj the mean square of
    input coordinate j on expert t's proxy text (no linear solve in this formula)."""
    got = _merge(zoo, tmp_path, "regmean", {"non_diagonal_ratio": 0.0})
    models = [AutoModelForCausalLM.from_pretrained(e, attn_implementation="sdpa").eval() for e in zoo["experts"]]
    inputs = [capture_inputs(m, windows) for m in models]
    for name in inputs[0]:
        squares = [x[name].pow(2).mean(0) for x in inputs]
        weights = [m.state_dict()[name].double() for m in models]
        expected = sum(s * w for s, w in zip(squares, weights)) / sum(squares)
        error = (got[name] - expected).abs().max().item()
        assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("method", ["regmean", "regmean_plus_plus"])
def test_identical_experts_merge_to_that_expert(zoo, tmp_path, method):
    copies = [shutil.copytree(zoo["experts"][0], tmp_path / f"copy{i}") for i in range(2)]
    got = _merge(zoo, tmp_path, method, {}, experts=copies)
    expert = AutoModelForCausalLM.from_pretrained(zoo["experts"][0]).state_dict()
    errors = _errors(got, {k: v.double() for k, v in expert.items()})
    assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda e: e[1])


def test_regmean_plus_plus_takes_layer_statistics_through_the_merged_layers(zoo, tmp_path, windows):
    """Against the reference that carries each expert's text through the merged embedding and
    layers 0…ℓ−1; the same merge with each expert's own layers (RegMean) is far off, so the
    test fails if the pre-pass takes layer ℓ's statistics from the experts' own layers."""
    ratio = RegMeanPlusPlusSettings().non_diagonal_ratio
    got = _merge(zoo, tmp_path, "regmean_plus_plus", {})
    expected = regmean_plus_plus_merge(zoo["base"], zoo["experts"], windows, ratio)
    errors = _errors(got, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])  # measured 5.5e-7
    own_layers = regmean_merge(zoo["base"], zoo["experts"], windows, ratio)
    for layer in range(3):  # layer 0 too: its inputs come from the merged embedding
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert (own_layers[name] - expected[name]).abs().max() > 1e-2, name
