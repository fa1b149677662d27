"""The `mergekit-esm` command. Merging itself is stock `mergekit-yaml`; this adds `tune`."""

from pathlib import Path

import click

from mergekit_esm import __version__
from mergekit_esm.integration.run import exit_on_interrupt
from mergekit_esm.strength.tune import tune as run_tune


class _Commands(click.Group):
    """The command group, with Ctrl-C answered as a shell expects: one line, exit status 130."""

    def invoke(self, ctx):
        with exit_on_interrupt("nothing partial was kept"):
            return super().invoke(ctx)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="mergekit-esm")
def main():
    """mergekit-esm tools (merge with: mergekit-yaml recipe.yml out/)."""


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names (validation tasks).")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of your own lm-eval task YAMLs.")
@click.option("--low", default=0.0, show_default=True, help="Lower end of the α range.")
@click.option("--high", type=float, default=None, help="Upper end of the α range [default: 4 for esm, 3 otherwise].")
@click.option("--tolerance", default=0.01, show_default=True, help="Stop when the α bracket is this narrow.")
@click.option("--max-trials", default=15, show_default=True, help="At most this many merges + evaluations.")
@click.option("--limit", type=int, default=None, help="Score only the first N examples of each task.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--cuda", is_flag=True, help="Merge on the GPU (as mergekit-yaml --cuda).")
def tune(recipe, out, tasks, include_path, low, high, tolerance, max_trials, limit, batch_size, cuda):
    """Golden-section search of α on labeled validation tasks; writes OUT/best_recipe.yml,
    OUT/model (the best merge), OUT/tune.md, OUT/tune.json and OUT/score_vs_alpha.png."""
    from mergekit.options import MergeOptions

    run_tune(
        recipe,
        [t.strip() for t in tasks.split(",") if t.strip()],
        out,
        include_path=include_path,
        low=low,
        high=high,
        tolerance=tolerance,
        max_trials=max_trials,
        limit=limit,
        batch_size=batch_size,
        merge_options=MergeOptions(device="cuda" if cuda else "cpu"),
    )


if __name__ == "__main__":
    main()
