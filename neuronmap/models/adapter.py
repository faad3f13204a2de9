"""Architecture-neutral layer names for any supported model, resolved to modules and hook recipes.

``ModelAdapter(model)`` maps canonical names (``embed``, ``blocks.{i}``, ``blocks.{i}.attn``,
``blocks.{i}.mlp``, ``blocks.{i}.attn.pattern``, ``final``; ``encoder.``/``decoder.`` prefixes and
``decoder.blocks.{i}.cross_attn[.pattern]`` for T5) to ``LayerRef``s: which module to hook, whether
on its input or output, and how to pick the tensor. It never modifies the model; a capture module
registers the hooks. Semantics of each name: docs/internals.md, "Canonical semantics".

Layer specs (``resolve``): comma-separated names; globs (``*`` within one dotted segment, ``**``
across segments, see ``layerspec``); inclusive ranges ``blocks.2-5[.attn]``; ``module:<dotted.path>``
for any submodule (its raw output, first tensor of a tuple); ``all`` = every hidden-kind name
(embed, blocks, attn, mlp, cross_attn, final) but no attention patterns, which are large and need
eager attention: ask for them explicitly (``blocks.*.attn.pattern`` or ``**.pattern``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from neuronmap.errors import UnknownLayerError
from neuronmap.models import layerspec
from neuronmap.models.architectures import ArchSpec, find_spec, get_path


@dataclass(frozen=True)
class LayerRef:
    """One capturable layer.

    ``hook == "output"``: register a forward hook on ``module`` and call ``select(output)``.
    ``hook == "input"``: register a forward pre-hook with ``with_kwargs=True`` and call
    ``select(args, kwargs)`` (``select((args, kwargs))`` works too). The selected tensor has shape
    ``(batch, seq, *feature)`` for ``kind == "hidden"`` and ``(batch, heads, q, k)`` for ``"pattern"``.
    """

    name: str
    module: nn.Module
    module_path: str
    hook: Literal["output", "input"]
    select: Callable[..., torch.Tensor]
    kind: Literal["hidden", "pattern"] = "hidden"
    # Registers a helper hook the ref needs while it is captured (OPT's MLP records the block's
    # (batch, seq) shape to un-flatten its rows); whoever hooks the ref registers and removes it too.
    prepare: Callable[[], torch.utils.hooks.RemovableHandle] | None = None

    def attach(self, callback: Callable[[torch.Tensor], Any]) -> torch.utils.hooks.RemovableHandle:
        """Register a hook that calls ``callback(tensor)``; remove it with ``handle.remove()``."""
        if self.prepare is not None:
            helper = self.prepare()
            main = LayerRef(self.name, self.module, self.module_path, self.hook, self.select, self.kind).attach(callback)
            return _Handles(helper, main)
        if self.hook == "input":
            def pre_hook(_module, args, kwargs):
                callback(self.select(args, kwargs))

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_module, _args, output):
            callback(self.select(output))

        return self.module.register_forward_hook(hook)


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles: torch.utils.hooks.RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class LayerShape:
    """Shape of one layer's tensor without batch and sequence: ``(d,)`` hidden, ``(heads, "seq", "seq")`` pattern."""

    name: str
    kind: str
    module_path: str
    shape: tuple[int | str, ...]


def select_first(output: Any) -> torch.Tensor:
    """The module's tensor output, or the first element of its output tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def select_hidden_input(*args_kwargs: Any) -> torch.Tensor:
    """``hidden_states`` of a block call: ``kwargs["hidden_states"]`` or the first positional argument."""
    args, kwargs = args_kwargs if len(args_kwargs) == 2 else args_kwargs[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def select_weights(output: Any) -> torch.Tensor:
    """The attention weights: last element of the attention module's output tuple."""
    weights = output[-1] if isinstance(output, (tuple, list)) else None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise RuntimeError("the attention module returned no weights (fused attention kernel): capture attention "
                           "patterns inside `adapter.attention_patterns(refs)` or use adapter.forward")
    return weights


def _select_unflatten(shapes: dict[int, torch.Size], block_id: int, output: Any) -> torch.Tensor:
    tensor = select_first(output)
    return tensor.view(*shapes[block_id], tensor.shape[-1])


class ModelAdapter:
    """Canonical layer names of ``model`` (a transformers model, or any nn.Module with a block list).

    Parameters
    ----------
    model : nn.Module
        Base or head model; the adapter finds the base through ``model.base_model``.
    name : str, optional
        Model name used in error messages (defaults to ``config.name_or_path``).
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        self.model = model
        config = getattr(model, "config", None)
        self.config = config
        self.name = name or getattr(config, "name_or_path", None) or type(model).__name__
        base = getattr(model, "base_model", model)
        self.base = base if isinstance(base, nn.Module) else model
        self.family = getattr(config, "model_type", None) or type(model).__name__.lower()
        self.spec: ArchSpec = find_spec(self.base, getattr(config, "model_type", None))
        self._base_path = self._path_of(self.base)
        self.stacks = [stack.prefix for stack in self.spec.stacks]
        self.is_encoder_decoder = self.stacks == ["encoder.", "decoder."]
        self.stack_blocks = {s.prefix: len(get_path(self.base, s.blocks)) for s in self.spec.stacks}
        self.n_blocks = next(iter(self.stack_blocks.values()))
        self._flat_shapes: dict[int, torch.Size] = {}
        self._refs: dict[str, LayerRef] = {}
        for stack in self.spec.stacks:
            self._add_stack(stack)

    # ----------------------------------------------------------------------------------------- names
    def layer_names(self) -> list[str]:
        """Every canonical name, in execution order."""
        return list(self._refs)

    def resolve(self, spec: str | Sequence[str]) -> list[LayerRef]:
        """Refs for a layer spec (see module docstring); canonical names in execution order, then ``module:`` refs.

        Raises
        ------
        UnknownLayerError
            An item matches no layer, a range runs past the last block, or a module path does not exist.
        """
        items = layerspec.split_spec(spec)
        if not items:
            raise UnknownLayerError(f"empty layer spec {spec!r}: {self._valid_hint()}")
        names = self.layer_names()
        chosen: set[str] = set()
        modules: list[LayerRef] = []
        for item in items:
            if item.startswith("module:"):
                ref = self._module_ref(item[len("module:"):].strip())
                if ref.name not in {r.name for r in modules}:
                    modules.append(ref)
            elif item.lower() == "all":
                chosen.update(n for n in names if self._refs[n].kind == "hidden")
            else:
                chosen.update(self._match_item(item, names))
        return [self._refs[n] for n in names if n in chosen] + modules

    def _match_item(self, item: str, names: list[str]) -> list[str]:
        patterns = layerspec.expand_ranges(item)
        if patterns is None:
            raise UnknownLayerError(f"bad layer range {item!r}: write ranges low-high, e.g. blocks.0-2; "
                                    f"{self._valid_hint()}")
        found: list[str] = []
        for pattern in patterns:
            matched = layerspec.match(pattern, names)
            if not matched:
                raise UnknownLayerError(f"unknown layer {item!r}: {self._valid_hint(item)}")
            found.extend(matched)
        return found

    def _valid_hint(self, item: str = "") -> str:
        counts = "; ".join(f"{p}blocks.0-{n - 1}" for p, n in self.stack_blocks.items())
        hint = ""
        if self.stacks != [""] and item and not any(item.startswith(p) for p in self.stacks):
            hint = f"names of this model start with {' or '.join(self.stacks)}; "
        valid = ", ".join(layerspec.abbreviate(self.layer_names()))
        return (f"{hint}the model has {counts}; valid names: {valid}, all, module:<path>. "
                f"See `neuronmap models layers {self.name}`")

    # ------------------------------------------------------------------------------------ running
    @contextmanager
    def attention_patterns(self, refs: Sequence[LayerRef] | None = None) -> Iterator[None]:
        """Switch to eager attention while pattern refs are captured; restore the previous implementation.

        Fused kernels (sdpa, flash) never materialise the weights. No-op when ``refs`` holds no pattern,
        when the model already runs eager, or when the model cannot switch (it then returns weights itself
        or the pattern select raises).
        """
        if refs is not None and not any(ref.kind == "pattern" for ref in refs):
            yield
            return
        config = self.config
        previous = getattr(config, "_attn_implementation", None)
        can_switch = (hasattr(self.model, "set_attn_implementation")
                      and getattr(self.model, "_can_set_attn_implementation", lambda: False)())
        if previous in (None, "eager") or not can_switch:
            yield
            return
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                refs: Sequence[LayerRef]) -> None:
        """Run the model the way ``refs`` need it; hooks registered on the refs see the activations.

        Encoder-decoder models run only the encoder when every ref is an encoder layer, else the whole
        model with teacher forcing: ``decoder_input_ids`` = ``input_ids`` shifted right (decoder start
        token first) and ``decoder_attention_mask = attention_mask`` (right padding keeps lengths).
        Decoder-only and encoder models run their base model unless a ``module:`` ref lies outside it
        (then the full model, head included). Gradients follow the caller's torch grad mode.
        """
        device = self._device()
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        with self.attention_patterns(refs):
            if self.is_encoder_decoder or self.stacks == ["encoder."]:
                self._forward_seq2seq(input_ids, attention_mask, refs)
            else:
                inside = all(self._is_inside(ref.module, self.base) for ref in refs)
                target = self.base if inside else self.model
                target(**self._call_kwargs(target, input_ids, attention_mask))

    def _forward_seq2seq(self, input_ids, attention_mask, refs) -> None:
        encoder = get_path(self.base, self.spec.stacks[0].blocks.rpartition(".")[0])
        only_encoder = not self.is_encoder_decoder or all(
            ref.name.startswith("encoder.") or (ref.name.startswith("module:") and self._is_inside(ref.module, encoder))
            for ref in refs)
        if only_encoder:
            target = encoder if self.is_encoder_decoder else self.model
            target(input_ids=input_ids, attention_mask=attention_mask)
            return
        self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=self.shift_right(input_ids),
                   decoder_attention_mask=attention_mask, use_cache=False)

    def shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: ``[start, x0, ..., x_{n-2}]`` (start = ``decoder_start_token_id``)."""
        start = getattr(self.config, "decoder_start_token_id", None)
        start = getattr(self.config, "pad_token_id", 0) if start is None else start
        shifted = input_ids.new_full(input_ids.shape, start)
        shifted[..., 1:] = input_ids[..., :-1]
        return shifted

    def describe(self, tokenizer=None) -> list[LayerShape]:
        """Name, kind, module path and per-token shape of every canonical layer, from one tiny forward.

        Patterns are included (shape ``(heads, "seq", "seq")``); hidden shapes exclude batch and sequence.
        """
        if tokenizer is not None:
            input_ids = torch.as_tensor([tokenizer("Hello world")["input_ids"]])
        else:
            vocab = getattr(self.config, "vocab_size", None) or 8
            input_ids = torch.arange(1, 5).clamp(max=vocab - 1)[None]
        refs = list(self._refs.values())
        shapes: dict[str, tuple] = {}
        handles = [ref.attach(partial(lambda name, t: shapes.setdefault(name, tuple(t.shape)), ref.name))
                   for ref in refs]
        try:
            with torch.no_grad():
                self.forward(input_ids, torch.ones_like(input_ids), refs)
        finally:
            for handle in handles:
                handle.remove()
        out = []
        for ref in refs:
            shape = shapes.get(ref.name, ())
            per_token = (shape[1], "seq", "seq") if ref.kind == "pattern" and shape else tuple(shape[2:])
            out.append(LayerShape(ref.name, ref.kind, ref.module_path, per_token))
        return out

    # ------------------------------------------------------------------------------------ building
    def _add_stack(self, stack) -> None:
        p, spec = stack.prefix, self.spec
        blocks_path = self._full(stack.blocks)
        blocks = get_path(self.base, stack.blocks)
        self._add(f"{p}embed", blocks[0], f"{blocks_path}.0", "input", select_hidden_input)
        for i, block in enumerate(blocks):
            bpath = f"{blocks_path}.{i}"
            sub = partial(self._sub, block, bpath)
            if spec.attn and sub(spec.attn):
                self._add(f"{p}blocks.{i}.attn", *sub(spec.attn), "output", select_first)
            if spec.pattern and sub(spec.pattern):
                self._add(f"{p}blocks.{i}.attn.pattern", *sub(spec.pattern), "output", select_weights, "pattern")
            if p == "decoder." and spec.cross_attn and sub(spec.cross_attn):
                self._add(f"{p}blocks.{i}.cross_attn", *sub(spec.cross_attn), "output", select_first)
                self._add(f"{p}blocks.{i}.cross_attn.pattern", *sub(spec.cross_pattern), "output", select_weights,
                          "pattern")
            if spec.mlp and sub(spec.mlp):
                select, prepare = select_first, None
                if spec.mlp_flat:
                    prepare = partial(block.register_forward_pre_hook, partial(self._record_shape, id(block)),
                                      with_kwargs=True)
                    select = partial(_select_unflatten, self._flat_shapes, id(block))
                self._add(f"{p}blocks.{i}.mlp", *sub(spec.mlp), "output", select, prepare=prepare)
            self._add(f"{p}blocks.{i}", block, bpath, "output", select_first)
        final = get_path(self.base, stack.final) if stack.final else None
        if final is not None:
            self._add(f"{p}final", final, self._full(stack.final), "output", select_first)
        else:
            last = len(blocks) - 1
            self._add(f"{p}final", blocks[last], f"{blocks_path}.{last}", "output", select_first)

    def _record_shape(self, block_id: int, _module, args, kwargs) -> None:
        self._flat_shapes[block_id] = select_hidden_input(args, kwargs).shape[:-1]

    @staticmethod
    def _sub(block: nn.Module, block_path: str, rel: str) -> tuple[nn.Module, str] | None:
        module = get_path(block, rel)
        if module is None:
            return None
        if rel.startswith("layer.-1"):  # T5: spell the real index in the module path
            rel = rel.replace("-1", str(len(block.layer) - 1), 1)
        return module, f"{block_path}.{rel}"

    def _add(self, name, module, path, hook, select, kind="hidden", prepare=None) -> None:
        self._refs[name] = LayerRef(name, module, path, hook, select, kind, prepare)

    def _module_ref(self, path: str) -> LayerRef:
        try:
            module = self.model.get_submodule(path) if path else None
        except AttributeError:
            module = None
        if module is None:
            known = [n for n, _ in self.model.named_modules() if n]
            close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UnknownLayerError(f"unknown module path {path!r} in {type(self.model).__name__}: {hint}"
                                    f"module paths are the names of model.named_modules(), e.g. {known[0]}")
        return LayerRef(f"module:{path}", module, path, "output", select_first, "hidden")

    # ------------------------------------------------------------------------------------ helpers
    def _path_of(self, target: nn.Module) -> str:
        if target is self.model:
            return ""
        return next(name for name, module in self.model.named_modules() if module is target)

    def _full(self, rel: str) -> str:
        return f"{self._base_path}.{rel}" if self._base_path else rel

    def _is_inside(self, module: nn.Module, root: nn.Module | None) -> bool:
        # Called on every forward: walking root.modules() each time cost ~6 ms per batch on a
        # 22-block Llama, as much as the GPU forward itself. The members are remembered per root.
        if root is None:
            return False
        cache = self.__dict__.setdefault("_members", {})
        members = cache.get(id(root))
        if members is None or members[0] is not root:
            members = cache[id(root)] = (root, frozenset(id(m) for m in root.modules()))
        return id(module) in members[1]

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @staticmethod
    def _call_kwargs(target: nn.Module, input_ids, attention_mask) -> dict:
        try:
            params = inspect.signature(target.forward).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if attention_mask is not None and ("attention_mask" in params or accepts_any):
            kwargs["attention_mask"] = attention_mask
        if "use_cache" in params:
            kwargs["use_cache"] = False
        if params and "input_ids" not in params and not accepts_any:
            first = next(iter(params))
            kwargs = {first: input_ids}
        return kwargs

