"""Each bad input gets one clear `Error:` line, a non-zero exit, and nothing written."""

import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from mergekit.scripts.run_yaml import main as mergekit_yaml_main
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, MistralConfig

from eval.byte_tokenizer import byte_tokenizer
from mergekit_esm.errors import EsmInputError, ensure_finite
from tests.conftest import mergekit_yaml, recipe
from tests.tiny_models import tiny_config, write_model


def run(tmp_path, config, monkeypatch):
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = CliRunner().invoke(mergekit_yaml_main, [str(config), str(out)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "esm-partial" in p.name]
    return errors[0]


def _copy_model(src, dst, edit=None, config=None, tokenizer=None):
    state = load_file(src / "model.safetensors")
    if edit:
        edit(state)
    return write_model(dst, state, config or tiny_config(), tokenizer)


@pytest.fixture
def models(zoo):
    return zoo["base"], zoo["experts"]


def test_missing_base_model(tmp_path, models, monkeypatch):
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts)
    text = config.read_text().replace(f"base_model: {base}\n", "")
    config.write_text(text)
    assert "needs `base_model:`" in run(tmp_path, config, monkeypatch)


def test_fewer_than_two_experts(tmp_path, models, monkeypatch):
    base, experts = models
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, experts[:1]), monkeypatch)
    assert "at least 2 experts" in message


def test_misspelt_parameter_is_an_error_with_a_suggestion(tmp_path, models, monkeypatch):
    base, experts = models
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"gama": 0.2}), monkeypatch)
    assert "unknown parameter 'gama'" in message and "did you mean 'gamma'" in message


def test_a_parameter_of_another_method_is_an_error(tmp_path, models, monkeypatch):
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts, {"gamma": 0.2}, merge_method="tsv")
    assert "unknown parameter 'gamma' for tsv in `parameters`" in run(tmp_path, config, monkeypatch)
    config = recipe(tmp_path / "r.yml", base, experts, {"common_space_fraction": 0}, merge_method="iso_cts")
    assert "iso_cts parameter 'common_space_fraction'" in run(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("method", ["regmean", "regmean_plus_plus"])
def test_non_diagonal_ratio_outside_0_1_is_an_error(tmp_path, models, monkeypatch, method):
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts, {"non_diagonal_ratio": 1.5}, merge_method=method)
    message = run(tmp_path, config, monkeypatch)
    assert f"{method} parameter 'non_diagonal_ratio'" in message and "1.5" in message


def test_misspelt_per_model_parameter(tmp_path, models, monkeypatch):
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts)
    config.write_text(config.read_text().replace(f"- model: {experts[0]}", f"- model: {experts[0]}\n  parameters:\n    proxi: x.txt"))
    assert "unknown parameter 'proxi'" in run(tmp_path, config, monkeypatch)


def test_invalid_parameter_value(tmp_path, models, monkeypatch):
    base, experts = models
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"gamma": -1}), monkeypatch)
    assert "'gamma'" in message and "greater than or equal to 0" in message


@pytest.mark.parametrize("alpha", ["banana", -1])
def test_invalid_alpha_names_both_forms_it_takes(tmp_path, models, monkeypatch, alpha):
    base, experts = models
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"alpha": alpha}), monkeypatch)
    assert f"parameter 'alpha' takes a non-negative number or 'auto' (got {alpha!r})" in message


def test_expert_with_other_shapes(tmp_path, models, monkeypatch):
    base, experts = models
    torch.manual_seed(1)
    config = tiny_config(hidden=48)
    other = write_model(tmp_path / "wide", LlamaForCausalLM(config).state_dict(), config)
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], other]), monkeypatch)
    assert "has shape" in message and "base's shapes" in message


def test_expert_with_other_architecture(tmp_path, models, monkeypatch):
    base, experts = models
    llama = tiny_config()
    mistral = MistralConfig(**{k: getattr(llama, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")})
    state = load_file(experts[1] / "model.safetensors")
    from transformers import MistralForCausalLM

    model = MistralForCausalLM(mistral)
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "mistral")
    byte_tokenizer().save_pretrained(tmp_path / "mistral")
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], tmp_path / "mistral"]), monkeypatch)
    assert "MistralForCausalLM" in message and "architecture" in message


def test_architecture_without_target_linears(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=258))
        model.save_pretrained(tmp_path / f"gpt{i}")
        byte_tokenizer().save_pretrained(tmp_path / f"gpt{i}")
        paths.append(tmp_path / f"gpt{i}")
    message = run(tmp_path, recipe(tmp_path / "r.yml", paths[0], paths[1:]), monkeypatch)
    assert "lacks ESM's target linears" in message


def test_expert_identical_to_base(tmp_path, models, monkeypatch):
    base, experts = models
    same = _copy_model(base, tmp_path / "same")
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], same]), monkeypatch)
    assert "identical to the base" in message


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_nan_in_a_weight(tmp_path, models, monkeypatch, name):
    base, experts = models

    def poison(state):
        state[name].view(-1)[0] = math.nan if state[name].ndim == 2 else math.inf

    bad = _copy_model(experts[1], tmp_path / "nan", poison)
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], bad]), monkeypatch)
    assert f"tensor {name}" in message and "NaN or Inf" in message


def test_missing_and_empty_proxy_files(tmp_path, models, monkeypatch):
    base, experts = models
    (tmp_path / "empty.txt").write_text("\n")
    assert "does not exist" in run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"proxy": str(tmp_path / "nope.txt")}), monkeypatch)
    assert "holds no text" in run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"proxy": str(tmp_path / "empty.txt")}), monkeypatch)


def test_too_few_proxy_tokens_for_the_rank(tmp_path, models, monkeypatch):
    base, experts = models
    (tmp_path / "short.txt").write_text("tiny")
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, experts, {"proxy": str(tmp_path / "short.txt")}), monkeypatch)
    # the largest default rank of the tiny zoo (hidden 32, intermediate 64, 3 experts): ⌊32/3⌋
    assert "gives 5 tokens" in message and "needs at least 10" in message


def test_vocabulary_mismatch(tmp_path, models, monkeypatch):
    base, experts = models
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other = _copy_model(experts[1], tmp_path / "vocab", tokenizer=tokenizer)
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], other]), monkeypatch)
    assert "another vocabulary" in message


def test_pickle_only_checkpoint(tmp_path, models, monkeypatch):
    base, experts = models
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(experts[1] / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text((experts[1] / "config.json").read_text())
    byte_tokenizer().save_pretrained(pickled)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], tmp_path / "pickled"]), monkeypatch)
    assert "pickle" in message and "save_pretrained" in message


def test_missing_model_folder_is_named_as_a_folder(tmp_path, models, monkeypatch):
    """mergekit takes a path that is not a folder for a Hub id: the Hub's repo-id complaint
    must not be what a mistyped folder gets."""
    base, experts = models
    missing = tmp_path / "no_such_expert"
    message = run(tmp_path, recipe(tmp_path / "r.yml", base, [experts[0], missing]), monkeypatch)
    assert f"model folder {missing} does not exist" in message and "Repo id" not in message


def test_offline_hub_id_not_in_the_cache_fails_at_once(tmp_path, models):
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, [experts[0], "my-org/not-downloaded"])
    result = mergekit_yaml(config, tmp_path / "out", tmp_path / "cache")  # with HF_HUB_OFFLINE=1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert errors == [
        "Error: model my-org/not-downloaded is neither a local folder nor in the Hugging Face cache, and "
        "HF_HUB_OFFLINE=1 forbids downloading it: download it while online, or give the path of a local copy"
    ]
    assert not (tmp_path / "out").exists()


def test_output_folder_with_other_content_is_refused(tmp_path, models, monkeypatch):
    base, experts = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(mergekit_yaml_main, [str(recipe(tmp_path / "r.yml", base, experts)), str(tmp_path / "out")])
    assert result.exit_code != 0 and "is not an earlier merge" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_interrupted_run_leaves_no_output_and_keeps_an_earlier_merge(tmp_path, models, monkeypatch, zoo):
    """Ctrl-C while mergekit writes shards: no output folder; an earlier output stays intact."""
    from mergekit.io.tensor_writer import TensorWriter

    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts, {"proxy": str(zoo["proxy"])})
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    original = TensorWriter.save_tensor

    def interrupt_after_some(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TensorWriter, "save_tensor", interrupt_after_some)
    result = CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp_path / "out")])
    assert calls["n"] == 10 and result.exit_code != 0
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "esm-partial" in p.name]

    monkeypatch.setattr(TensorWriter, "save_tensor", original)
    assert CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp_path / "out")]).exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(TensorWriter, "save_tensor", interrupt_after_some)
    assert CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp_path / "out")]).exit_code != 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


# mergekit-yaml that sends itself SIGTERM when the pre-pass starts merging its first layer,
# after calibration has spilled hidden states to disk
SIGTERM_AT_FIRST_LAYER = """
import os, signal, sys
import mergekit_esm.integration.prepare as prepare
merge_layer = prepare.merge_layer
def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return merge_layer(*args, **kwargs)
prepare.merge_layer = terminated
from mergekit.scripts.run_yaml import main
main(sys.argv[1:])
"""


def test_sigterm_removes_everything_the_run_wrote(tmp_path, models, zoo):
    """kill / timeout / a scheduler's limit: exit 143 with no output, staging folder, cache
    scratch or spilled hidden states left; a staging folder of a killed run is swept."""
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts, {"proxy": str(zoo["proxy"])})
    stale = tmp_path / ".out.esm-partial-999999999"  # no such process
    stale.mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp"),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SIGTERM_AT_FIRST_LAYER, str(config), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 143, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "esm-partial" in p.name]
    assert not list((tmp_path / "tmp").iterdir())
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]


# mergekit-yaml that sends itself SIGINT (Ctrl-C) when the pre-pass starts merging its first layer
# A shell started in the background ignores SIGINT, and so would the child: restore Python's
# handler so the test behaves as in a terminal however the suite is launched.
SIGINT_AT_FIRST_LAYER = SIGTERM_AT_FIRST_LAYER.replace("SIGTERM", "SIGINT").replace(
    "import os, signal, sys\n", "import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
)


def test_ctrl_c_in_mergekit_yaml_exits_130_with_one_line(tmp_path, models, zoo):
    """A shell expects 130 from a process stopped by Ctrl-C; click said "Aborted!" and exited 1."""
    base, experts = models
    config = recipe(tmp_path / "r.yml", base, experts, {"proxy": str(zoo["proxy"])})
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SIGINT_AT_FIRST_LAYER, str(config), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Interrupted: the merge stopped and wrote no output" in result.stderr.splitlines()
    assert "Aborted!" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_mergekit_esm_tune_exits_130_with_one_line(tmp_path, models, monkeypatch):
    from mergekit_esm import cli
    from mergekit_esm.strength import tune as tune_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    base, experts = models
    monkeypatch.setattr(tune_module, "score", interrupted)
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    config = recipe(tmp_path / "r.yml", base, experts, merge_method="tsv")
    result = CliRunner().invoke(cli.main, ["tune", str(config), str(tmp_path / "tuned"), "--tasks", "x"])
    assert result.exit_code == 130, result.output[-2000:]
    assert "Interrupted: nothing partial was kept" in result.output and "Aborted!" not in result.output
    assert not (tmp_path / "tuned" / ".trials").exists()


def test_hidden_state_folder_of_a_killed_run_is_swept(tmp_path, models, zoo, monkeypatch):
    """SIGKILL runs no cleanup: the next calibration removes the spilled-hidden-state folders
    whose process is gone, and only those."""
    import tempfile

    base, experts = models
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    stale = tmp_path / "tmp" / "mergekit-esm-hidden-999999999-x1y2z3"  # no such process
    live = tmp_path / "tmp" / f"mergekit-esm-hidden-{os.getppid()}-a1b2c3"  # a running process's
    stale.mkdir(parents=True)
    live.mkdir()
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    config = recipe(tmp_path / "r.yml", base, experts, {"proxy": str(zoo["proxy"])})
    result = CliRunner().invoke(mergekit_yaml_main, [str(config), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output[-2000:]
    assert list((tmp_path / "tmp").iterdir()) == [live]


def test_real_cli_prints_one_error_line_without_traceback(tmp_path, models):
    base, experts = models
    result = mergekit_yaml(recipe(tmp_path / "r.yml", base, experts, {"rnak": 4}), tmp_path / "out", tmp_path / "cache")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Error: unknown parameter 'rnak' for esm in `parameters`: did you mean 'rank'?" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finiteness_check_decides_every_case(dtype):
    """The fast path (a finite sum) and the entry-wise test behind it: NaN and Inf anywhere
    are refused; finite entries whose sum overflows are accepted."""
    large = torch.full((4, 4), torch.finfo(dtype).max, dtype=dtype)
    ensure_finite(large, "w", "m")  # the sum is inf, every entry is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(4, 4, dtype=dtype)
        x[2, 3] = bad
        with pytest.raises(EsmInputError, match="NaN or Inf"):
            ensure_finite(x, "w", "m")


def test_tune_without_lm_eval_stops_before_any_merge(tmp_path, models, monkeypatch):
    from mergekit_esm import cli

    base, experts = models
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    config = recipe(tmp_path / "r.yml", base, experts, merge_method="tsv")
    result = CliRunner().invoke(cli.main, ["tune", str(config), str(tmp_path / "tuned"), "--tasks", "x"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "cache").exists()  # nothing merged
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert errors == ["Error: tune scores merges with lm-eval, which is not installed: pip install 'mergekit-esm[eval]'"]


def test_tune_leaves_no_trial_merges_when_it_fails(tmp_path, models, monkeypatch):
    """A failure after some trials (here: scoring the second) removes the trials' merges."""
    from mergekit_esm import cli
    from mergekit_esm.strength import tune as tune_module

    base, experts = models
    calls = []

    def score_once(path, tasks, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise EsmInputError("lm-eval does not know the task(s) x")
        return {t: 0.5 for t in tasks}

    monkeypatch.setattr(tune_module, "score", score_once)
    monkeypatch.setenv("MERGEKIT_ESM_CACHE", str(tmp_path / "cache"))
    config = recipe(tmp_path / "r.yml", base, experts, merge_method="tsv")
    result = CliRunner().invoke(cli.main, ["tune", str(config), str(tmp_path / "tuned"), "--tasks", "x"])
    assert len(calls) == 2 and result.exit_code == 1, result.output[-2000:]
    assert "Error: lm-eval does not know the task(s) x" in result.output
    assert not (tmp_path / "tuned" / ".trials").exists()
