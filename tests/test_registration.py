"""The installed package plugs into stock mergekit through its .pth file, cheaply."""

import subprocess
import sys


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout


def test_interpreter_start_loads_only_the_hook():
    out = _python("import sys; print('torch' in sys.modules, 'mergekit_esm._import_hook' in sys.modules)")
    assert out.split() == ["False", "True"]


def test_stock_mergekit_sees_esm_and_routes_run_merge():
    out = _python(
        "import mergekit.merge_methods as m, mergekit.merge as mm\n"
        "from mergekit.scripts.run_yaml import run_merge\n"
        "spec = m.get('esm').spec\n"
        "print(spec.pretty_name, sorted(p.name for p in spec.parameters))\n"
        "print(getattr(run_merge, '__wrapped_by_esm__', False), run_merge is mm.run_merge)\n"
        "print([m.get(n).spec.name for n in ('tsv', 'iso_c', 'iso_cts')])"
    )
    first, second, third = out.strip().splitlines()
    assert first.startswith("ESM (Essential Subspace Merging)") and "'gamma'" in first and "'proxy'" in first
    assert second == "True True"
    assert third == "['tsv', 'iso_c', 'iso_cts']"


def test_other_methods_pass_through_untouched(zoo, tmp_path):
    from tests.conftest import mergekit_yaml

    config = tmp_path / "ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        + "".join(f"  - model: {e}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for e in zoo["experts"])
        + "dtype: float32\n"
    )
    result = mergekit_yaml(config, tmp_path / "out", tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ESM" not in result.stderr and not (tmp_path / "cache").exists()


def test_kernel_outside_a_prepared_run_explains_itself():
    import pytest
    import torch
    from mergekit.merge_methods import get, merge_tensors

    from mergekit_esm.errors import EsmInputError

    with pytest.raises(EsmInputError, match="run through mergekit-yaml"):
        merge_tensors([torch.zeros(2), torch.ones(2), torch.ones(2)], get("esm"), base_index=0)


def test_mergekit_esm_prints_its_version():
    from importlib.metadata import version
    from pathlib import Path

    exe = Path(sys.executable).with_name("mergekit-esm")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"mergekit-esm, version {version('mergekit-esm')}"
