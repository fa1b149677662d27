import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import write_zoo

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
    """A recipe over the tiny zoo; ESM ones calibrate on a few short windows to stay fast."""
    fast = {"proxy_samples": 4, "proxy_max_tokens": 64} if merge_method == "esm" else {}
    config = {
        "merge_method": merge_method,
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {**fast, **(parameters or {})},
        "dtype": "float32",
        **top,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def mergekit_yaml(config: Path, out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """The real `mergekit-yaml` of this environment, in a subprocess."""
    exe = Path(sys.executable).with_name("mergekit-yaml")
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(exe), str(config), str(out), *flags], capture_output=True, text=True, env=env)
