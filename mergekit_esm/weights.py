"""Reading one input tensor at a time from a model on disk, checked as it is read.

The pre-pass (integration/prepare.py) and alpha: auto (strength/auto.py) both walk the input
models weight by weight; this module sits below both so that neither imports the other's
package for it.
"""

import functools

import torch
from mergekit.architecture.conversion import convert_checkpoint_tensors
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache

from mergekit_esm.errors import ensure_finite


@functools.cache
def _model_type(model: ModelReference) -> str:
    return model.config(trust_remote_code=LoaderCache().trust_remote_code).model_type


def checked_reader(model: ModelReference, device: str):
    """A function name → tensor of `model` on `device`, which rejects NaN and Inf.

    Names are those of the transformers model (what mergekit-yaml reads and writes): a tensor
    that transformers 5 keeps in another layout than the checkpoint's (a mixture-of-experts
    layer's stacked experts, stored per expert on disk) is converted as mergekit's own loader
    converts it, by transformers' conversion mapping. The last tensor converted is kept (callers
    never write to what they read): each expert MLP of a stacked tensor is a target weight of
    its own, and its E readers in a row would otherwise convert the whole stack E times."""
    loader = LoaderCache().get(model)
    on_disk = loader.index.tensor_paths
    last_converted: dict[str, torch.Tensor] = {}

    def read_stored(name: str) -> torch.Tensor:
        tensor = loader.get_tensor(name, device=device)
        # Close a safetensors shard at once: mergekit's loader keeps each model's last shard
        # mapped, and the mapped pages read so far stay in RSS until then (5 models × one
        # layer's weights at 1.1B widths: ~440 MB); callers copy what they read, and reopening
        # costs a header read. Not a PyTorch .bin shard, which mergekit loads whole on opening.
        if on_disk[name].endswith(".safetensors"):
            loader.flush()
        return tensor

    def read(name: str) -> torch.Tensor:
        if name in on_disk:
            tensor = read_stored(name)
        elif name in last_converted:
            return last_converted[name]
        else:
            last_converted.clear()  # released before the next conversion allocates
            sources = {key: (lambda key=key: read_stored(key)) for key in on_disk}
            tensor = convert_checkpoint_tensors(_model_type(model), sources, name)
            if tensor is None:
                raise KeyError(f"model {model} has no tensor {name}, nor the tensors transformers converts into it")
            tensor = last_converted[name] = tensor.to(device)
        ensure_finite(tensor, name, model)
        return tensor

    return read
