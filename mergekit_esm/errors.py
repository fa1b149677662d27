"""The one error type users see: a one-line message that says what is wrong and how to fix it."""

import click
import torch


class EsmInputError(click.ClickException):
    """Bad recipe or inputs. A ClickException so `mergekit-yaml` prints `Error: <message>`
    and exits 1 instead of a traceback; from Python it is an ordinary exception."""


def ensure_finite(tensor: torch.Tensor, name: str, model) -> None:
    # A finite sum proves every entry finite (NaN and ±Inf propagate) and costs a fraction of
    # the entry-wise test on bf16 CPU tensors; the entry-wise test decides only when the sum
    # is not finite (or overflowed).
    if not torch.isfinite(tensor.sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
        raise EsmInputError(
            f"tensor {name} of model {model} contains NaN or Inf: repair or re-export that checkpoint"
        )
