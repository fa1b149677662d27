"""The one error type users see: a one-line message that says what is wrong and how to fix it."""

import click
import torch


class EsmInputError(click.ClickException):
    """Bad recipe or inputs. A ClickException so `mergekit-yaml` prints `Error: <message>`
    and exits 1 instead of a traceback; from Python it is an ordinary exception."""


def ensure_finite(tensor: torch.Tensor, name: str, model) -> None:
    if not torch.isfinite(tensor).all():
        raise EsmInputError(
            f"tensor {name} of model {model} contains NaN or Inf: repair or re-export that checkpoint"
        )
