"""The PV step of every quantized layer: for each layer, one iteration of pvtheory's Algorithm 1
(pvtheory.pv.pv_iteration) on the layer as a discrete-continuous parameter (layer.as_param()) and the loss as
the observed gradient dL/dW of the step's batch.

    layer_pv = LayerPV(layers, p_steps)              # {name: quantized layer}, {name: P step or None}
    with layer_pv.capturing():                       # every layer keeps its dL/dW in backward
        loss.backward()
        changed = layer_pv.step()                    # each layer's P (and V) step from its dL/dW

The P steps are a strategy's (llm.strategies), one per layer; a V step per layer (a pvtheory Step) is optional:
where given, the layer's codebooks and scales are stepped here and leave the model's optimizer. Fine-tuning and
calibration's block tuning both run their P steps through this class.

One optimization changes when, never what: `during_backward()` around the step's last backward pass runs each
layer's step as soon as that layer's dL/dW is complete (in one process; under torch.distributed it starts the
gradient on its way to the layer's owner instead), so only one layer's float32 gradient is alive at a time. The
codes are the same either way: a layer's own gradients are done when its hook fires, and the decoded weights and
code indices autograd saved are copies.

Under torch.distributed (owner: layer name -> rank) each layer's steps run on its owner rank, which alone keeps
their state; every rank then receives the owners' new codes (and values).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from llm import distributed as D
from llm.checkpoint import flatten_state, unflatten_state
from pvtheory.objectives import ObservedGradient
from pvtheory.pv import pv_iteration
from pvtheory.steps import stateless
from pvtheory.v_steps import no_v_step

KEEP_CODES = stateless("keep codes", lambda param, objective: param)


class LayerPVError(RuntimeError):
    """A P-step state that cannot be restored."""


class LayerPV:
    """The P (and V) steps of a model's quantized layers, from their captured dL/dW (see the module docstring)."""

    def __init__(self, layers: dict, p_steps: dict, v_steps: Optional[dict] = None, owner: Optional[dict] = None,
                 grad_dtype: torch.dtype = torch.float32) -> None:
        """layers: name -> quantized layer; p_steps: name -> P step (None: its codes stay); v_steps: name -> V step
        (optional); owner: name -> rank under torch.distributed (None: this process steps every layer);
        grad_dtype: the precision of dL/dW summed onto the owners."""
        self.layers = dict(layers)
        self.p_steps = {n: p_steps.get(n) for n in self.layers}
        self.v_steps = dict(v_steps) if v_steps else {}
        self.distributed = owner is not None
        self.owner = dict(owner) if owner is not None else {n: D.rank() for n in self.layers}
        self.grad_dtype = grad_dtype
        self.changes_codes = any(s is not None for s in self.p_steps.values())  # a P step: not continuous-only
        self.active = self.changes_codes or bool(self.v_steps)
        self.states: dict = {}  # layer name -> (P step state, V step state)
        self._buckets: Optional[D.GradientBuckets] = None  # gradients on their way to their owners
        self._changed_in_backward = 0  # groups changed by steps taken during this step's backward

    def owns(self, name: str) -> bool:
        return self.owner[name] == D.rank()

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's step states (under torch.distributed, those of the layers it owns), as tensors."""
        out = {}
        for name, (p_state, v_state) in self.states.items():
            out.update(flatten_state(p_state, f"p/{name}"))
            out.update(flatten_state(v_state, f"v/{name}"))
        return out

    def load_state_dict(self, state: dict, device) -> None:
        """Restore from a (whole-model) state; each rank keeps the layers it owns."""
        if any(k.startswith("p.") for k in state):
            raise LayerPVError("this checkpoint stores the P step's state in an older layout that cannot be "
                               "resumed: fine-tune into another --out, or --overwrite to restart this one")

        def stored(prefix: str) -> bool:  # a state tree stored under exactly this name
            return any(k == prefix or k.startswith((prefix + "#", prefix + "/")) for k in state)

        self.states = {n: (unflatten_state(state, f"p/{n}", device), unflatten_state(state, f"v/{n}", device))
                       for n in self.layers if self.owns(n) and stored(f"p/{n}")}

    # --- gradients --------------------------------------------------------------------------------
    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator["LayerPV"]:
        """Inside, every layer accumulates dL/dW over the backward passes (what step() reads); on exit, even by
        an error, capture is off and nothing captured is left behind."""
        for layer in self.layers.values():
            layer.capture_weight_grad = enabled
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.capture_weight_grad = False
                layer.weight_grad = None
                layer.on_weight_grad = None
            self._buckets = None

    @contextmanager
    def during_backward(self, enabled: bool = True) -> Iterator[None]:
        """Around the step's last backward pass: each layer's step runs (one process) or its gradient starts for
        its owner (torch.distributed) as soon as the layer's dL/dW is complete. A V step waits for step()
        (autograd still needs the scales it would change); enabled=False (a non-finite loss: the step will be
        refused) leaves everything to step()."""
        in_process = not self.distributed and not self.v_steps
        if not (enabled and self.active and (self.distributed or in_process)):
            yield
            return
        if self.distributed:
            self._buckets = D.GradientBuckets(self.owner, self.grad_dtype)

        def complete(layer) -> None:  # a layer's dL/dW of the whole step is ready
            name = names[id(layer)]
            if self._buckets is not None:  # on its way to the owner
                self._buckets.add(name, layer.weight_grad)
            else:  # its step now: only one layer's dL/dW is alive at a time
                with torch.no_grad():
                    self._changed_in_backward += self._update_layer(name, layer, layer.weight_grad)
            layer.weight_grad = None

        names = {id(layer): name for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.on_weight_grad = complete
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.on_weight_grad = None

    # --- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> int:
        """Every layer's P (and V) step from its captured gradient (summed over processes onto the layer's owner,
        in buckets, in grad_dtype; every rank then receives the owners' new codes and values), the layers
        stepped during backward excepted. Returns the number of code groups changed."""
        grads = {}
        for name, layer in self.layers.items():
            if layer.weight_grad is not None:
                grads[name] = layer.weight_grad
            layer.weight_grad = None
        if self.distributed:  # onto their owners, with any not sent during backward
            buckets = self._buckets or D.GradientBuckets(self.owner, self.grad_dtype)
            for name, g in grads.items():
                buckets.add(name, g)
            grads, self._buckets = buckets.finish(), None
        changed = sum(self._update_layer(n, self.layers[n], g) for n, g in grads.items())  # this rank's layers
        changed, self._changed_in_backward = changed + self._changed_in_backward, 0
        if self.distributed:  # every rank receives the owners' codes (and values) and the total count
            D.broadcast_from_owners_({n: layer.codes for n, layer in self.layers.items()}, self.owner)
            if self.v_steps:
                values = {(n, i): v.data for n, layer in self.layers.items()
                          for i, v in enumerate(layer.value_parameters())}
                D.broadcast_from_owners_(values, {key: self.owner[key[0]] for key in values})
            device = next(iter(self.layers.values())).codes.device
            total = torch.as_tensor(changed, device=device).to(torch.float64).reshape(1)
            D.all_reduce_sum_([total])
            changed = total
        return int(changed)  # the step's one wait for the device

    def _update_layer(self, name: str, layer: nn.Module, g: Tensor) -> Tensor:
        """One layer's PV iteration from its weight gradient g; returns the number of groups changed (a 0-dim
        tensor on the device, so that no layer waits for the device)."""
        param, objective = layer.as_param(), ObservedGradient(g)
        p_step = self.p_steps[name] or KEEP_CODES
        v_step = self.v_steps.get(name) or no_v_step()
        if name not in self.states:
            self.states[name] = (p_step.init(param, objective), v_step.init(param, objective))
        after_p, after_v, p_state, v_state, changed = pv_iteration(param, objective, p_step, v_step, *self.states[name])
        self.states[name] = (p_state, v_state)
        if after_p.codes is not param.codes:  # unchanged codes are copied back as they are: no branch on the device
            layer.set_codes(after_p.codes)
        if name in self.v_steps:
            layer.set_values(after_v.values)
        return changed

