import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _isolate_caches() -> Path:
    """Point every cache the suite could write (mergekit-esm's, Hugging Face's hub and datasets,
    matplotlib's, the XDG default) at one temporary folder for the whole session: tests must
    never touch a user's caches, and a test that names no cache would otherwise write
    ~/.cache/mergekit-esm. Subprocesses inherit it."""
    root = Path(tempfile.mkdtemp(prefix="mergekit-esm-tests-"))
    for name, folder in {
        "MERGEKIT_ESM_CACHE": "mergekit-esm",
        "HF_HOME": "huggingface",
        "HF_HUB_CACHE": "huggingface/hub",
        "HF_DATASETS_CACHE": "huggingface/datasets",
        "MPLCONFIGDIR": "matplotlib",
        "XDG_CACHE_HOME": "xdg",
    }.items():
        os.environ[name] = str(root / folder)
    return root


# before the imports below: huggingface_hub reads its cache variables once, when imported
SESSION_CACHES = _isolate_caches()

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.tiny_models import write_zoo  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHES, ignore_errors=True)

PROXY_TEXT = "\n\n".join(
    f"Document {i}: the quick brown fox {i} jumps over {i * 7} lazy dogs near river {i % 5}."
    for i in range(40)
)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base, experts = write_zoo(root, n_experts=3)
    proxy = root / "proxy.txt"
    proxy.write_text(PROXY_TEXT)
    return {"root": root, "base": base, "experts": experts, "proxy": proxy}


def recipe(path: Path, base, experts, parameters=None, merge_method="esm", **top) -> Path:
    """A recipe over the tiny zoo; methods that calibrate do it on a few short windows to stay fast."""
    calibrated = merge_method in ("esm", "regmean", "regmean_plus_plus")
    fast = {"proxy_samples": 4, "proxy_max_tokens": 64} if calibrated else {}
    # the tests hold merges to float64 references: pin the reference precision (ESM's `auto`
    # is float32; test_end_to_end runs that default against this reference)
    config = {
        "merge_method": merge_method,
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {**fast, "precision": "float64", **(parameters or {})},
        "dtype": "float32",
        **top,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def mergekit_yaml(config: Path, out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """The real `mergekit-yaml` of this environment, in a subprocess: for the tests of the
    installed command itself (its entry point, what a user's shell sees)."""
    exe = Path(sys.executable).with_name("mergekit-yaml")
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(exe), str(config), str(out), *flags], capture_output=True, text=True, env=env)


def merge_in_process(config: Path, out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """mergekit-yaml's own command run in this process, as mergekit_yaml's result: the same
    merge without a new interpreter's imports (seconds per merge, most of a tiny merge's time).
    An exception that escaped the command is appended to stderr, as its traceback would be."""
    import traceback

    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    args = [str(config), str(out), *flags]
    result = CliRunner().invoke(main, args, env={"MERGEKIT_ESM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)
