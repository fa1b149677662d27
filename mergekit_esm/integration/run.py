"""The run_merge wrapper: preflight, pre-pass, then mergekit's own run into a staging folder.

mergekit's writer is not atomic (shards go straight into the output folder), so our methods
write into a hidden sibling folder that replaces the output only once the merge is whole:
a crash, Ctrl-C or SIGTERM leaves no folder that loads as a model.
"""

import functools
import os
import shutil
import signal
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from mergekit_esm.cache import remove_stale
from mergekit_esm.errors import EsmInputError
from mergekit_esm.strength.auto import BUDGET_WORDS


@contextmanager
def staged_output(out_path: str):
    out = Path(out_path).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "mergekit_config.yml").exists())):
        raise EsmInputError(
            f"output path {out_path} exists and is not an earlier merge: choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.esm-partial-")
    staging = out.with_name(f".{out.name}.esm-partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.esm-replaced-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


@contextmanager
def exit_on_sigterm():
    """SIGTERM (`kill`, `timeout`, a scheduler's time limit) unwinds the merge as Ctrl-C does,
    so the staging folder, the cache's scratch and the spilled hidden states are removed; by
    default Python dies on it without running any cleanup. Exit status 143, as the shell
    reports a process killed by SIGTERM. Handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def exit_on_interrupt(message: str):
    """Ctrl-C ends a command with status 130, as a shell expects of a process stopped by
    SIGINT, and one line; click would print "Aborted!" and exit 1. Cleanup inside the block
    has run by the time the KeyboardInterrupt reaches here."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"Interrupted: {message}", err=True)
        raise SystemExit(128 + signal.SIGINT) from None


def _on_interrupt():
    """Under a command (mergekit-yaml, mergekit-esm tune), Ctrl-C exits 130; called from
    Python, it stays a KeyboardInterrupt for the caller."""
    if click.get_current_context(silent=True) is None:
        return nullcontext()
    return exit_on_interrupt("the merge stopped and wrote no output")


def _card_value(settings, name: str, value) -> str:
    """A setting as the card's reader should see it: an unset one (None) as the default that
    applied, in the words of the field's description ("...; default X."), not "None"."""
    if value is not None:
        return str(value)
    description = type(settings).model_fields[name].description or ""
    _, found, default = description.partition("; default ")
    return f"default ({default.rstrip('.')})" if found else "default"


def _card_section(prepared) -> str:
    inputs = prepared.inputs
    method = inputs.method
    settings = inputs.settings.model_dump()
    # the layout's own module types: fused blocks (Phi-3's q/k/v of qkv_proj) and MoE experts included
    targets = ", ".join(dict.fromkeys(t.module_type for t in inputs.layout.targets))
    lines = [
        "",
        f"## {method.name} settings",
        "",
        f"Merged with [{method.pretty_name}]({method.reference_url}) by mergekit-esm: "
        f"{method.formula} on the linears {targets}; "
        "vocabulary matrices W0 + α·(sum or mean, see embedding_merge) of the task vectors; "
        "norms W0 + α·mean(ΔW_t).",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_card_value(inputs.settings, k, v)} |" for k, v in settings.items()]
    if prepared.alpha_search:
        tried = ", ".join(f"{a:.3g}: {loss:.4f}" for a, loss in sorted(prepared.alpha_search.items()))
        lines.append(f"| α chosen by alpha: auto | {prepared.alpha:.4g} (distinctive-token loss per α tried: {tried}) |")
        cost, budget = prepared.alpha_retention
        lines.append(
            f"| alpha: auto's cost to the base | {cost:+.3f} nats/token on text the base wrote (budget, "
            f"{BUDGET_WORDS[inputs.settings.auto_alpha_budget]}: {budget:+.3f}) |"
        )
    ranks = sorted({k for k in inputs.ranks.values() if k is not None})
    if ranks:
        lines.append(f"| rank used (k per expert) | {', '.join(map(str, ranks))} |")
    lines += [f"| experts | {len(inputs.experts)} |", ""]
    return "\n".join(lines)


def _finish_card(staging: Path, name: str, prepared) -> None:
    """Title mergekit's model card with the output folder's name (mergekit took the name of
    the staging folder it wrote into) and add the method's settings."""
    card = staging / "README.md"
    if not card.exists():
        return
    text = card.read_text(encoding="utf-8").replace(f"\n# {staging.name}\n", f"\n# {name}\n", 1)
    card.write_text(text + _card_section(prepared), encoding="utf-8")


def wrap_run_merge(run_merge):
    """Route our methods' recipes through preflight + pre-pass + staging; others pass through."""

    @functools.wraps(run_merge)
    def run_merge_with_esm(merge_config, out_path, options, *args, **kwargs):
        from mergekit_esm.integration.registration import activated
        from mergekit_esm.methods import METHODS

        if merge_config.merge_method not in METHODS:
            return run_merge(merge_config, out_path, options, *args, **kwargs)
        # Intel OpenMP threads spin while they wait. When another process shares the cores,
        # MKL's eigensolver then slows by orders of magnitude. Read when OpenMP starts, i.e.
        # at the first parallel torch op.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from mergekit_esm.integration.preflight import preflight
        from mergekit_esm.integration.prepare import prepare

        with _on_interrupt(), exit_on_sigterm(), staged_output(out_path) as staging:
            prepared = prepare(preflight(merge_config, options))
            with activated(prepared):
                run_merge(merge_config, str(staging), options, *args, **kwargs)
            _finish_card(staging, Path(out_path).resolve().name, prepared)

    run_merge_with_esm.__wrapped_by_esm__ = True
    return run_merge_with_esm
