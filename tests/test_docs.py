"""The README documents every recipe parameter, and .ci/run runs the README's test command."""

from pathlib import Path

from mergekit_esm.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_parameter():
    readme = (ROOT / "README.md").read_text()
    missing = [
        (method.name, name)
        for method in METHODS.values()
        for name in method.settings_type.model_fields
        if f"| `{name}` |" not in readme
    ]
    assert not missing
    assert all(f"`merge_method: {name}`" in readme for name in METHODS)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"


def test_readme_table_lists_every_tested_architecture():
    from tests.tiny_models import ARCHITECTURES

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Supported architectures") :]
    assert all(f"| `{name}` |" in section for name in ARCHITECTURES)
