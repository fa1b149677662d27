"""Run proxy tokens through one expert a decoder layer at a time and collect its inputs' statistics.

Only one layer's weights and the proxy hidden states are in memory at once, so peak
memory does not grow with depth. Weights are read through a caller-supplied function
(mergekit's lazy loader in practice).
"""

import contextlib
import inspect
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from mergekit_esm.algebra.subspace import InputMoment, add_gram_upper_, fill_lower_from_upper_
from mergekit_esm.architecture import DecoderLayout, build_model_skeleton
from mergekit_esm.cache import process_temporary_directory
from mergekit_esm.errors import EsmInputError


@dataclass
class LayerMoments:
    layer: int
    moments: dict[str, InputMoment]  # input group → X, XᵀX or ΔW XᵀX ΔWᵀ, whichever is smallest


class _ModelInputsRecorded(Exception):
    """Stops the model's own forward once every decoder layer's inputs are recorded."""


class LayerStack:
    """The model's decoder layers on the meta device, run on token windows one layer at a time.

    Each layer's weights are loaded just before it runs and released after, so memory holds
    one layer plus the windows' hidden states, at any depth. Windows are whole causal
    sequences (no padding).

    What a layer needs besides its hidden states (rotary embeddings of its kind, its causal or
    sliding-window mask, position ids) and the first layer's input (embeddings with the
    architecture's scale or multiplier) come from the model's own forward, run once per window
    with the decoder layers replaced by recorders: nothing an architecture computes between
    its embedding and its layers is copied here, so each architecture transformers knows
    is calibrated as its own forward would run it.
    """

    def __init__(self, layout: DecoderLayout, device: str | torch.device = "cpu"):
        self.layout, self.device = layout, device
        self.model = build_model_skeleton(layout.config, device)
        self.decoder = self.model.get_submodule(layout.layers_name.rsplit(".", 1)[0])
        self.layers = self.model.get_submodule(layout.layers_name)
        self._layer_inputs: dict[int, list[tuple[tuple, dict]]] = {}  # window length → per layer (args, kwargs)

    def _record_inputs(self, window: list[int]) -> torch.Tensor:
        """Run the model's own forward on one window up to its first decoder layer's input
        (returned) and record every layer's other inputs for windows of this length."""
        recorded, first_input = [], []

        def recorder(hidden_states, *args, **kwargs):
            first_input.append(hidden_states)
            recorded.append((args, kwargs))
            if len(recorded) == len(self.layers):
                raise _ModelInputsRecorded  # the final norm's weights are not loaded
            return hidden_states

        for layer in self.layers:
            layer.forward = recorder  # an instance attribute: the layer keeps its attributes
        try:
            self.decoder(input_ids=torch.tensor([window], device=self.device), use_cache=False)
        except _ModelInputsRecorded:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        self._layer_inputs[len(window)] = recorded
        return first_input[0]

    def embed(self, embedding: torch.Tensor, windows: list[list[int]]) -> list[torch.Tensor]:
        """The first decoder layer's input for each window, the model's embedding `embedding`
        applied as its forward applies it."""
        module = self.model.get_input_embeddings()
        module.load_state_dict({"weight": embedding.to(self.device, torch.float32)}, assign=True)
        hidden = [self._record_inputs(w) for w in windows]
        module.to("meta")
        return hidden

    def load_layer(self, index: int, read_tensor: Callable[[str], torch.Tensor]) -> None:
        layer = self.layers[index]
        prefix = f"{self.layout.layers_name}.{index}."
        layer.load_state_dict(
            {n: read_tensor(prefix + n).to(self.device, torch.float32) for n, _ in layer.named_parameters()},
            assign=True,
        )

    def run_layer(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each window through layer `index` (loaded), replacing its hidden state in `hidden`
        as it goes: old and new states of all windows are never held together."""
        layer = self.layers[index]
        for i, h in enumerate(hidden):
            args, kwargs = self._layer_inputs[h.shape[1]][index]
            hidden[i] = layer(h, *args, **kwargs)
        return hidden

    def release(self, index: int) -> None:
        self.layers[index].to("meta")

    def token_losses(
        self, hidden: list[torch.Tensor], windows: list[list[int]], read_tensor: Callable[[str], torch.Tensor]
    ) -> torch.Tensor:
        """Cross-entropy of every next token of every window (concatenated, float32, CPU),
        the final norm's parameters (a bias too, as StableLM's) and the output projection read
        by `read_tensor`.

        The logits come from the model's own head (its final logit soft-capping or scaling
        included): its forward runs with the decoder stack replaced by the final norm of the
        last layer's output."""
        norm_name, head_name = self.layout.head_names
        final_norm = self.model.get_submodule(norm_name)
        final_norm.load_state_dict(
            {n: read_tensor(f"{norm_name}.{n}").to(self.device, torch.float32) for n, _ in final_norm.named_parameters()},
            assign=True,
        )
        output = self.model.get_output_embeddings()
        output.load_state_dict({"weight": read_tensor(head_name).to(self.device, torch.float32)}, assign=True)
        # the stand-in returns the decoder's own output type: a mixture-of-experts head reads
        # its router_logits field (None: no auxiliary loss is asked for)
        output_type = inspect.signature(type(self.decoder).forward).return_annotation
        if not (isinstance(output_type, type) and issubclass(output_type, ModelOutput)):
            output_type = BaseModelOutputWithPast
        losses = []
        try:
            for h, w in zip(hidden, windows):
                self.decoder.forward = lambda *_args, h=h, **_kwargs: output_type(last_hidden_state=final_norm(h))
                logits = self.model(input_ids=torch.tensor([w], device=self.device), use_cache=False).logits
                target = torch.tensor(w[1:], device=self.device)
                losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], target, reduction="none").cpu())
        finally:
            del self.decoder.forward
            final_norm.to("meta")
            output.to("meta")
        return torch.cat(losses)


def held_form(n_tokens: int, d_in: int, sole_reader_d_out: int | None = None, shift_bytes: int = 4) -> str:
    """Which form of InputMoment takes the fewest bytes: "tokens" (X, n × d_in) or "moment"
    (XᵀX, d_in²), both float32, or, for an input read by one weight alone (d_out given),
    "shift" (ΔW XᵀX ΔWᵀ, d_out², `shift_bytes` per number: it is held in the sums' dtype)."""
    sizes = {"tokens": 4 * n_tokens * d_in, "moment": 4 * d_in * d_in}
    if sole_reader_d_out is not None:
        sizes["shift"] = shift_bytes * sole_reader_d_out**2
    return min(sizes, key=sizes.get)


class _InputCollector:
    """Forward pre-hook that gathers one input group's activations over all windows in the form
    `held_form` picks (InputMoment). For the shift moment it is given the sole reader's task
    matrix ΔW and sums ΔOᵀΔO of ΔO = X ΔWᵀ: for Llama-3-8B's down_proj that is 4096² numbers
    instead of 14336² and fewer multiply-adds than XᵀX and ΔW XᵀX ΔWᵀ together. X and XᵀX are
    kept in float32 at the end, the shift moment in the sums' dtype: rounded to float32 it
    would carry errors of eps·λ₁ in every direction, where XᵀX's rounding reaches S scaled by
    ΔW, and fine-tuned ΔWs span decades (measured in docs/performance.md).
    Sums are taken in `sum_dtype`: float64 for the float64 precision (the
    cut at rank k is sensitive to XᵀX where eigenvalues cluster near λ_k); float32 otherwise,
    since a consumer GPU multiplies float64 at 1/64 of its float32 rate (the sums of
    Llama-3-8B's 14336-wide down_proj input would take seconds per layer and expert). Tests
    hold the float32 path to the float64 reference."""

    def __init__(self, n_tokens: int, d_in: int, device, sum_dtype: torch.dtype, delta: torch.Tensor | None = None):
        # n_tokens bounds the rows it is given: all of them, or the share a router sends an
        # expert MLP, which is known when the forward has run (`filled` counts them)
        self.n_tokens, self.d_in, self.filled, self.delta = n_tokens, d_in, 0, delta
        # the caller passes ΔW only where held_form chose the shift moment
        self.form = "shift" if delta is not None else held_form(n_tokens, d_in)
        if self.form == "tokens":
            self.tokens = torch.empty(n_tokens, d_in, device=device, dtype=torch.float32)
        else:
            size = d_in if self.form == "moment" else delta.shape[0]
            self.sum = torch.zeros(size, size, device=device, dtype=sum_dtype)

    def __call__(self, _module, args):
        x = args[0].reshape(-1, self.d_in)
        if self.form == "tokens":
            self.tokens[self.filled : self.filled + x.shape[0]] = x
        elif self.form == "moment":
            add_gram_upper_(self.sum, x.to(self.sum.dtype))
        else:
            add_gram_upper_(self.sum, x.to(self.sum.dtype) @ self.delta.T)
        self.filled += x.shape[0]

    def result(self) -> InputMoment:
        if self.form == "tokens":
            return InputMoment(self.filled, tokens=self.tokens[: self.filled])
        if self.form == "moment":
            return InputMoment(self.filled, moment=fill_lower_from_upper_(self.sum).float())
        return InputMoment(self.filled, shift=fill_lower_from_upper_(self.sum))


class _ExpertInputs(TorchFunctionMode):
    """Hands each expert MLP its inputs as the experts module's own forward computes them.

    transformers' eager experts forward (the one build_meta_model selects) calls
    F.linear(tokens routed to expert e, stacked[e]) for every expert its router chose, on
    gate_up_proj and then down_proj: an F.linear whose weight is a view of a stacked experts
    parameter tells, by the view's offset, which expert reads that input. Every routed token
    must reach its expert's collector: `check_complete` compares them with the router's choices
    (what the experts module was given), so a forward that applies experts otherwise (fused
    kernels, a layout changed by a later transformers) stops calibration instead of skewing it.
    """

    def __init__(self, watched: dict[str, tuple[nn.Module, dict[tuple[str, int], _InputCollector]]]):
        super().__init__()
        # experts module name → (module, (stacked parameter name, expert) → collector)
        self.watched = watched
        self.routed = dict.fromkeys(watched, 0)
        self.hooks = [
            module.register_forward_pre_hook(lambda _m, args, name=name: self._count_routed(name, module, args[1]))
            for name, (module, _) in watched.items()
        ]

    def _count_routed(self, name: str, module: nn.Module, top_k_index: torch.Tensor) -> None:
        self.routed[name] += int((top_k_index < module.num_experts).sum())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            for module, collectors in self.watched.values():
                for parameter_name in ("gate_up_proj", "down_proj"):
                    stacked = getattr(module, parameter_name)
                    if weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr():
                        expert = (weight.storage_offset() - stacked.storage_offset()) // stacked.stride(0)
                        collectors[parameter_name, expert](None, (args[0],))
        return func(*args, **kwargs)

    def check_complete(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for name, (_, collectors) in self.watched.items():
            for parameter_name in ("gate_up_proj", "down_proj"):
                seen = sum(c.filled for (p, _), c in collectors.items() if p == parameter_name)
                if seen != self.routed[name]:
                    raise EsmInputError(
                        f"calibration saw {seen} routed tokens reach {name}.{parameter_name} but the router "
                        f"sent {self.routed[name]}: this transformers version's experts forward does not apply "
                        "each expert with F.linear on its slice of the stacked weights"
                    )


@torch.inference_mode()
def layer_input_moments(
    read_tensor: Callable[[str], torch.Tensor],
    layout: DecoderLayout,
    windows: list[list[int]],
    device: str | torch.device = "cpu",
    sum_dtype: torch.dtype = torch.float64,
    read_base: Callable[[str], torch.Tensor] | None = None,
    read_merged: Callable[[str], torch.Tensor] | None = None,
) -> Iterator[LayerMoments]:
    """Yield each layer's input statistics, in layer order, for this expert's weights.

    With `read_base` (the base model's weights), an input that one weight alone reads
    (down_proj's) may be held as that weight's shift moment ΔW XᵀX ΔWᵀ, ΔW = this expert's
    weight − the base's, both as read here, in `sum_dtype` (what the merge computes too).

    With `read_merged` (the merged model's weights; RegMean++), the windows are embedded by
    the merged embedding, and layer ℓ's statistics come from this expert's layer ℓ run on
    them; once the caller has merged layer ℓ and resumes this generator, the hidden states
    move on through the merged layer ℓ (read then) instead of this expert's.

    Memory: one layer's weights, the windows' hidden states (n × hidden, float32) and this
    layer's statistics (in `sum_dtype` while summing); nothing grows with depth. On CPU the
    hidden states wait on disk while the caller runs the other experts and merges: RAM is the
    limit there, and the round trip (~0.3 s for 16k tokens at hidden 2048) is nothing next to
    a layer's minute or more. On a GPU they stay in device memory.
    """
    stack = LayerStack(layout, device)
    hidden = stack.embed((read_merged or read_tensor)(layout.embed_name), windows)
    n_tokens = sum(len(w) for w in windows)
    on_cpu = torch.device(device).type == "cpu"
    # closing this generator (or its end) removes the spilled hidden states
    with process_temporary_directory("hidden") if on_cpu else contextlib.nullcontext() as spill:
        for index in range(layout.num_layers):
            if hidden is None:
                hidden = torch.load(os.path.join(spill, "hidden.pt"), weights_only=True)
            stack.load_layer(index, read_tensor)
            collectors: dict[str, _InputCollector] = {}
            hooks = []
            routed: dict[str, tuple[nn.Module, dict]] = {}  # experts module → its experts' collectors
            targets = layout.layer_targets(index)
            readers = Counter(t.input_group for t in targets)
            for target in targets:
                if target.input_group in collectors:
                    continue  # q/k/v and gate/up read the same activation: count it once
                delta = None
                if read_base is not None and readers[target.input_group] == 1:
                    if held_form(n_tokens, target.shape[1], target.shape[0], sum_dtype.itemsize) == "shift":
                        delta = target.of(read_tensor(target.tensor)).to(device, sum_dtype) - target.of(
                            read_base(target.tensor)
                        ).to(device, sum_dtype)
                collector = _InputCollector(n_tokens, target.shape[1], device, sum_dtype, delta)
                collectors[target.input_group] = collector
                if target.expert is None:
                    module = stack.model.get_submodule(target.tensor.removesuffix(".weight"))
                    hooks.append(module.register_forward_pre_hook(collector))
                else:
                    owner, _, parameter_name = target.tensor.rpartition(".")
                    experts = routed.setdefault(owner, (stack.model.get_submodule(owner), {}))[1]
                    experts[parameter_name, target.expert] = collector
            expert_inputs = _ExpertInputs(routed) if routed else contextlib.nullcontext()
            with expert_inputs:
                if read_merged is None:
                    hidden = stack.run_layer(index, hidden)
                else:  # the merged layer carries the states on: this expert's outputs are dropped
                    stack.run_layer(index, list(hidden))
            if routed:
                expert_inputs.check_complete()
            for hook in hooks:
                hook.remove()
            stack.release(index)  # release this layer's weights before loading the next
            moments = {group: c.result() for group, c in collectors.items()}
            del collectors, collector, delta, routed, expert_inputs  # free the sums before the caller runs another expert
            if index + 1 == layout.num_layers:
                hidden = None  # the last layer's outputs feed nothing: not held while the caller merges
            elif spill is not None:
                torch.save(hidden, os.path.join(spill, "hidden.pt"))
                hidden = None
            yield LayerMoments(layer=index, moments=moments)
            del moments  # the caller holds them until it has merged this layer
            if read_merged is not None and index + 1 < layout.num_layers:
                if hidden is None:
                    hidden = torch.load(os.path.join(spill, "hidden.pt"), weights_only=True)
                stack.load_layer(index, read_merged)
                stack.run_layer(index, hidden)
                stack.release(index)
