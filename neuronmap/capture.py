"""Hook-based capture of named activations, without modifying the model.

`Capture` is a small context manager in the spirit of baukit's `TraceDict`: it registers exactly one
forward hook (or forward pre-hook) per requested layer, keeps what the hook saw under the layer's
canonical name, and removes every hook on exit -- also when the forward raises. Hugging Face blocks
return tuples; the layer's `select` callable (from the adapter) picks the tensor out, so detaching
and transforming always act on a tensor, never silently on a tuple.

Two things make extraction cheap:

* `transform` runs inside the hook, on the model's device, so pooling shrinks (batch, seq, d) to
  (batch, d) before anything is kept or copied to the host;
* `stop_early=True` aborts the forward as soon as every requested layer has fired, so blocks after
  the last one asked for (and the LM head) are never computed.

Example
-------
>>> refs = loaded.adapter.resolve("blocks.0-3")                      # doctest: +SKIP
>>> with Capture(refs, stop_early=True) as cap:                        # doctest: +SKIP
...     cap.run(loaded.adapter.forward, ids, mask, refs)
>>> cap.outputs["blocks.3"].shape                                     # doctest: +SKIP
torch.Size([8, 12, 768])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

Transform = Callable[[Any, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; `Capture.run` swallows it."""


class Capture:
    """Record the outputs (or inputs) of the modules named by `refs` during forward passes.

    Parameters
    ----------
    refs : sequence of LayerRef
        Resolved layers (see `neuronmap.models.adapter.LayerRef`): canonical name, module, whether
        to hook its output or its input, and a `select` that picks the tensor.
    transform : callable (ref, tensor) -> tensor, optional
        Applied inside the hook on the device, e.g. pooling over the attention mask.
    stop_early : bool
        Raise `StopForward` once every ref has fired in the current forward pass.
    detach : bool
        Detach captured tensors from the autograd graph (default). Set False for gradient work.

    Attributes
    ----------
    outputs : dict[str, torch.Tensor]
        Captured tensor per canonical name, from the most recent forward pass.
    """

    def __init__(
        self,
        refs: Sequence[Any],
        transform: Transform | None = None,
        stop_early: bool = False,
        detach: bool = True,
    ) -> None:
        names = [ref.name for ref in refs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"layers requested twice: {', '.join(dupes)}; list each layer once")
        self.refs = list(refs)
        self.transform = transform
        self.stop_early = stop_early
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        try:
            for ref in self.refs:
                self._handles.append(self._register(ref))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    # -- running ---------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Clear previous outputs, call `fn(*args, **kwargs)` and return its result.

        Returns None when the forward was cut short by `stop_early`.
        """
        self.outputs = {}
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None

    def missing(self) -> list[str]:
        """Names of requested layers that did not fire in the last forward pass."""
        return [ref.name for ref in self.refs if ref.name not in self.outputs]

    # -- hooks -----------------------------------------------------------------------------------
    def _register(self, ref: Any) -> torch.utils.hooks.RemovableHandle:
        prepare = getattr(ref, "prepare", None)
        if prepare is not None:  # a helper hook the ref needs (registered first, so it fires first)
            self._handles.append(prepare())
        if ref.hook == "input":

            def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self._keep(ref, ref.select((args, kwargs)))

            return ref.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            tensor = ref.select(output)
            self._keep(ref, tensor)
            return None if self.detach else _through(output, tensor)

        return ref.module.register_forward_hook(hook)

    def _keep(self, ref: Any, tensor: torch.Tensor) -> None:
        if ref.name in self.outputs:
            # A module called twice in one forward (weight sharing): keep the first call, which is
            # the one the canonical name refers to.
            return
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"layer {ref.name!r} ({ref.module_path}) produced {type(tensor).__name__}, not a tensor;"
                " pick another layer or a `module:` path whose output is a tensor"
            )
        if self.detach:
            tensor = tensor.detach()
        if self.transform is not None:
            tensor = self.transform(ref, tensor)
        self.outputs[ref.name] = tensor
        if self.stop_early and len(self.outputs) == len(self.refs):
            raise StopForward


def _through(output: Any, tensor: Any) -> Any:
    """`output` rebuilt from `tensor` when the capture kept a reshaped view of it, else None.

    Why: a gradient is taken with respect to the kept tensor, so the rest of the forward must read it.
    OPT's MLP returns flat (batch * seq, d) rows that the ref views as (batch, seq, d); that view is a
    leaf of nothing downstream unless the module's output is replaced by a view of it.
    """
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if (not isinstance(tensor, torch.Tensor) or tensor is hidden or tensor.shape == hidden.shape
            or tensor.numel() != hidden.numel() or tensor.data_ptr() != hidden.data_ptr()):
        return None
    new = tensor.reshape(hidden.shape)
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new
