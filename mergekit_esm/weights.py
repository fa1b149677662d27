"""Reading one input tensor at a time from a model on disk, checked as it is read.

The pre-pass (integration/prepare.py) and alpha: auto (strength/auto.py) both walk the input
models weight by weight; this module sits below both so that neither imports the other's
package for it.
"""

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache

from mergekit_esm.errors import ensure_finite


def checked_reader(model: ModelReference, device: str):
    """A function name → tensor of `model` on `device`, which rejects NaN and Inf."""
    loader = LoaderCache().get(model)

    def read(name: str) -> torch.Tensor:
        tensor = loader.get_tensor(name, device=device)
        # Close a safetensors shard at once: mergekit's loader keeps each model's last shard
        # mapped, and the mapped pages read so far stay in RSS until then (5 models × one
        # layer's weights at 1.1B widths: ~440 MB); callers copy what they read, and reopening
        # costs a header read. Not a PyTorch .bin shard, which mergekit loads whole on opening.
        if loader.index.tensor_paths[name].endswith(".safetensors"):
            loader.flush()
        ensure_finite(tensor, name, model)
        return tensor

    return read
