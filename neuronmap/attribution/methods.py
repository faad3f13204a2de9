"""Attribution of one target scalar to the input tokens of one prompt, Captum's verb and vocabulary.

`TokenAttribution(loaded).attribute(text, target=..., method=...)` returns one score per input token.
Gradient and perturbation methods come from Captum, run on the token *embeddings* (ids are not
differentiable): the model is called with ``inputs_embeds``, so position embeddings, masks and
everything after the embedding table are the model's own. Scores per token are the sum over the
embedding dimension (gradient methods) or the token's value (perturbation methods, where each token
is one feature). Two methods Captum lacks for transformers are written here: attention rollout
(Abnar & Zuidema 2020) and a Grad-CAM-style map over a block's output (hidden units play the role of
channels, tokens of positions).

Baselines replace every non-special token by the pad token (``baseline="pad"``, special tokens such
as BOS/[CLS]/[SEP] kept, as Captum's BERT tutorial does) or by zero vectors (``"zero"``).
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ..interventions._common import check_stack, tokenize
from ..token_ids import readable_token
from .targets import Target, parse_target, score

GRADIENT_METHODS = ("saliency", "grad-x-input", "ig", "layer-ig", "gradcam")
PERTURBATION_METHODS = ("shapley", "kernelshap", "lime")
METHODS = (*GRADIENT_METHODS, *PERTURBATION_METHODS, "rollout")
LAYER_METHODS = ("layer-ig", "gradcam")


@dataclass
class AttributionResult:
    """Scores of one method for one prompt.

    scores : ndarray (n_tokens,), one per input token (``tokens``)
    target_value : the target on the real input; baseline_value on the baseline (where one is used)
    delta : completeness gap of integrated gradients, sum(scores) - (target - baseline target)
    """

    method: str
    text: str
    tokens: list[str]
    scores: np.ndarray
    target: str
    target_description: str
    target_value: float
    baseline_value: float | None = None
    delta: float | None = None
    layer: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        top = int(np.argmax(np.abs(self.scores))) if len(self.scores) else 0
        return {"method": self.method, "target": self.target, "target_description": self.target_description,
                "target_value": self.target_value, "baseline_value": self.baseline_value, "delta": self.delta,
                "layer": self.layer, "n_tokens": len(self.tokens), "top_token": readable_token(self.tokens[top]) if self.tokens else None,
                "top_position": top, "top_score": float(self.scores[top]) if len(self.scores) else None,
                "sum_scores": float(self.scores.sum())}


class TokenAttribution:
    """Attribute a target of `loaded` (a `LoadedModel`, head loaded for logit targets) to input tokens.

    Parameters
    ----------
    loaded : LoadedModel
    baseline : {"pad", "zero"}
        What "absent" means for a token (integrated gradients, layer IG, Shapley, KernelSHAP, LIME).
    position : int
        Token position the target reads (negative counts from the end; -1 is the last token).
    """

    def __init__(self, loaded: Any, baseline: str = "pad", position: int = -1) -> None:
        if baseline not in ("pad", "zero"):
            raise ConfigError(f"baseline={baseline!r} is not supported; use pad or zero")
        check_stack(loaded, "attribution")  # the model runs as a function of one stack's input embeddings
        self.loaded = loaded
        self.model = loaded.model
        self.baseline = baseline
        self.position = position

    # -- public ------------------------------------------------------------------------------------
    def attribute(self, inputs: str, target: str = "next-token", method: str = "ig", layer: str | None = None,
                  n_steps: int = 64, n_samples: int = 64, seed: int = 0, internal_batch_size: int = 16
                  ) -> AttributionResult:
        """Scores of `method` for prompt `inputs` and `target` (see `neuronmap.attribution.targets`).

        n_steps : integration steps (ig, layer-ig); n_samples : permutations (shapley) or samples
        (kernelshap, lime); layer : canonical layer of layer-ig and gradcam (default and checks:
        `attribution_layer`).
        """
        if method not in METHODS:
            raise ConfigError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
        if not isinstance(inputs, str) or not inputs.strip():
            raise ConfigError("the prompt is empty: give the text to explain")
        for name, value in (("n_steps", n_steps), ("n_samples", n_samples), ("internal_batch_size", internal_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        ids = torch.tensor([tokenize(self.loaded, inputs)], device=self._device())
        mask = torch.ones_like(ids)
        position = self._position(ids.shape[1])
        self._target = parse_target(self.loaded, target, predicted=lambda: self._predicted(ids, mask, position))
        self._pos = position
        if self._target.kind == "neuron":
            self._neuron_ref = self._hidden_ref(self._target.layer, "a neuron: target")
        if method in LAYER_METHODS:
            layer = self._layer_for(layer, target, self._neuron_ref if self._target.kind == "neuron" else None)
            self._layer_ref = self._hidden_ref(layer, method)
        elif layer is not None:
            raise ConfigError(f"--layer applies to {', '.join(LAYER_METHODS)} only, not {method}")
        embeds = self.model.get_input_embeddings()(ids).detach()
        base = self._baseline_embeds(ids, embeds)
        with torch.no_grad():
            value = float(self._forward(embeds, mask)[0])
        torch.manual_seed(seed)
        result = AttributionResult(
            method=method, text=inputs, tokens=self.loaded.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
            scores=np.zeros(ids.shape[1]), target=target, target_description=self._target.describe(self.loaded.tokenizer),
            target_value=value, layer=layer,
            params={"method": method, "target": target, "baseline": self.baseline, "position": position,
                    "layer": layer, "n_steps": n_steps, "n_samples": n_samples, "seed": seed})
        scores, delta = getattr(self, "_" + method.replace("-", "_"))(embeds, base, mask, n_steps, n_samples,
                                                                      internal_batch_size)
        result.scores = np.asarray(scores, dtype=np.float64)
        result.delta = None if delta is None else float(delta)
        if method in ("ig", "layer-ig", "shapley", "kernelshap", "lime"):
            with torch.no_grad():
                result.baseline_value = float(self._forward(base, mask)[0])
        return result

    def attribution_layer(self, target: str = "next-token", layer: str | None = None) -> str:
        """The layer that layer-ig and gradcam attribute to for `target`, checked without running them.

        Their attributions are to a layer's activations, so for a ``neuron:`` target that layer must run
        strictly before the target's layer (at or after it, the target does not depend on it, and the
        forward stops at the target). `layer` given: exactly one layer that does, else ConfigError naming
        both and an earlier layer. `layer` None: the middle block; for a neuron target at or before it,
        the last residual-stream layer (``blocks.{i}``, or ``embed`` for a target in block 0) before the
        target. Other targets read the model's output, which every layer precedes.
        """
        neuron = None
        if isinstance(target, str) and target.partition(":")[0].strip() == "neuron":
            neuron = self.loaded.adapter.resolve(parse_target(self.loaded, target).layer)[0]
        return self._layer_for(layer, target, neuron)

    def _layer_for(self, layer: str | None, spec: str, neuron: Any) -> str:
        if layer is None:
            return self._default_layer(spec, neuron)
        ref = self._one_ref(layer)
        if neuron is None or self._runs_before(ref, neuron):
            return layer
        where = "is the layer of" if self._same_activation(ref, neuron) else "runs after"
        earlier = self._residual_before(neuron)
        fix = (f"pass an earlier layer such as {self._default_layer(spec, neuron)} or leave --layer out" if earlier
               else "no layer runs before it: use a token-level method (saliency, grad-x-input, ig, shapley)")
        raise ConfigError(f"--layer {layer} {where} the target {spec}: layer-ig and gradcam need a layer that runs "
                          f"before it; {fix}")

    def _default_layer(self, spec: str, neuron: Any) -> str:
        middle = f"blocks.{self.loaded.adapter.n_blocks // 2}"
        if neuron is None:
            return middle
        earlier = self._residual_before(neuron)
        if not earlier:
            raise ConfigError(f"no layer runs before the target {spec}, so layer-ig and gradcam have nothing to "
                              "attribute to; use a token-level method (saliency, grad-x-input, ig, shapley) or a "
                              "target in a later layer")
        return middle if middle in earlier else earlier[-1]

    def _residual_before(self, neuron: Any) -> list[str]:
        """Residual-stream layers (``embed``, ``blocks.{i}``) that run before `neuron`, in execution order.

        The residual stream, not the block's attn/mlp: it feeds everything after it, also in blocks whose
        attention and MLP run in parallel (GPT-J, GPT-NeoX), where the attention output never reaches the MLP.
        """
        adapter = self.loaded.adapter
        residual = {f"{p}embed" for p in adapter.stacks}
        residual.update(f"{p}blocks.{i}" for p, n in adapter.stack_blocks.items() for i in range(n))
        candidates = [name for name in adapter.layer_names() if name in residual]
        before = self._run_before([adapter.resolve(name)[0] for name in candidates], neuron)
        return [name for name, early in zip(candidates, before) if early]

    def _runs_before(self, ref: Any, neuron: Any) -> bool:
        return self._run_before([ref], neuron)[0]

    def _run_before(self, refs: list[Any], neuron: Any) -> list[bool]:
        """Whether each ref's activation is computed strictly before `neuron`'s in the forward pass.

        Canonical names: the adapter lists them in execution order. ``module:`` paths it cannot place:
        the order their hooks first fire in one forward pass on a short prompt.
        """
        names = self.loaded.adapter.layer_names()
        if all(r.name in names for r in (*refs, neuron)):
            order = {name: i for i, name in enumerate(names)}
        else:
            fired: list[str] = []
            handles = [r.attach(lambda _t, name=r.name: fired.append(name) if name not in fired else None)
                       for r in (*refs, neuron)]
            try:
                ids = torch.tensor([tokenize(self.loaded, "Hello world")], device=self._device())
                with torch.no_grad():
                    self.loaded.adapter.forward(ids, torch.ones_like(ids), [*refs, neuron])
            finally:
                for handle in handles:
                    handle.remove()
            order = {name: i for i, name in enumerate(fired)}
        last = order.get(neuron.name, len(order))
        # the same module and hook is the same activation, e.g. `final` of a model without a final norm
        return [not self._same_activation(r, neuron) and order.get(r.name, last) < last for r in refs]

    @staticmethod
    def _same_activation(ref: Any, neuron: Any) -> bool:
        return ref.module is neuron.module and ref.hook == neuron.hook

    # -- the model as a function of embeddings ---------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.expand(embeds.shape[0], -1)
        if self._target.kind == "neuron":
            ref = self._neuron_ref
            with Capture([ref], stop_early=True, detach=False) as cap:
                cap.run(self.model, inputs_embeds=embeds, attention_mask=mask)
            return score(self._target, None, cap.outputs[ref.name], self._pos)
        output = self.model(inputs_embeds=embeds, attention_mask=mask)
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ConfigError(f"target {self._target.spec!r} needs logits but {type(self.model).__name__} has no "
                              "head: load the model with its head (the CLI does) or use a neuron: target")
        return score(self._target, logits, None, self._pos)

    def _predicted(self, ids: torch.Tensor, mask: torch.Tensor, position: int) -> int:
        with torch.no_grad():
            logits = getattr(self.model(input_ids=ids, attention_mask=mask), "logits", None)
        if logits is None or logits.dim() != 3:
            raise ConfigError("target next-token needs a model with an LM head; use class:<k> or neuron:<layer>:<i>")
        return int(logits[0, position].argmax())

    # -- gradient methods (Captum) ---------------------------------------------------------------------
    def _saliency(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum.attr import Saliency

        attr = Saliency(self._forward).attribute(embeds.clone().requires_grad_(), additional_forward_args=(mask,),
                                                 abs=True)
        return _per_token(attr), None

    def _grad_x_input(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum.attr import InputXGradient

        attr = InputXGradient(self._forward).attribute(embeds.clone().requires_grad_(), additional_forward_args=(mask,))
        return _per_token(attr), None

    def _ig(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum.attr import IntegratedGradients

        attr, delta = IntegratedGradients(self._forward).attribute(
            embeds, baselines=base, additional_forward_args=(mask,), n_steps=n_steps, internal_batch_size=ibs,
            return_convergence_delta=True)
        return _per_token(attr), delta.item()

    def _layer_ig(self, embeds, base, mask, n_steps, n_samples, ibs):
        """Layer IG: Captum's IG over the layer's captured tensor, the model run with the interpolated tensor
        substituted for it (a forward hook on the module's output, or a pre-hook on a block's input for
        ``embed``). Captum's own ``LayerIntegratedGradients`` clones every element of a module's output or
        input, and Hugging Face modules return ``(output, None)`` (attention) or get a cache object or None
        among their inputs; nor can it follow a ref that views the output (OPT's flat MLP rows)."""
        from captum.attr import IntegratedGradients

        ref = self._layer_ref

        def captured(x):
            with torch.no_grad(), Capture([ref], stop_early=True) as cap:
                cap.run(self.model, inputs_embeds=x, attention_mask=mask)
            return cap.outputs[ref.name]

        def substitute(values, mask):
            def pre_hook(_module, args, kwargs):  # where the adapter's select_hidden_input reads it
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": values}
                return (values, *args[1:]), kwargs

            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                new = values.reshape(-1, *hidden.shape[1:])  # the ref's view back to the module's layout
                return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

            handle = (ref.module.register_forward_pre_hook(pre_hook, with_kwargs=True) if ref.hook == "input"
                      else ref.module.register_forward_hook(hook))
            try:
                return self._forward(embeds.expand(values.shape[0], -1, -1), mask)
            finally:
                handle.remove()

        attr, delta = IntegratedGradients(substitute).attribute(
            captured(embeds), baselines=captured(base), additional_forward_args=(mask,), n_steps=n_steps,
            internal_batch_size=ibs, return_convergence_delta=True)
        return _per_token(attr), delta.item()

    def _gradcam(self, embeds, base, mask, n_steps, n_samples, ibs):
        ref = self._layer_ref
        with torch.enable_grad(), Capture([ref], detach=False) as cap:
            value = cap.run(self._forward, embeds.clone().requires_grad_(), mask)
            activation = cap.outputs[ref.name]
            if activation.dim() != 3:
                raise ConfigError(f"gradcam needs a (batch, tokens, hidden) layer; {ref.name} gives "
                                  f"{tuple(activation.shape)}: pick a block, e.g. blocks.3")
            (grad,) = torch.autograd.grad(value.sum(), activation)
        weights = grad.mean(dim=1, keepdim=True)  # one weight per hidden unit ("channel")
        cam = torch.relu((weights * activation).sum(dim=-1))
        return cam[0].detach().float().cpu().numpy(), None

    # -- perturbation methods (Captum), one feature per token -------------------------------------------
    def _feature_mask(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        return torch.arange(n, device=embeds.device).view(1, n, 1).expand_as(embeds).contiguous()

    def _shapley(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum.attr import ShapleyValueSampling

        attr = ShapleyValueSampling(self._forward).attribute(
            embeds, baselines=base, additional_forward_args=(mask,), feature_mask=self._feature_mask(embeds),
            n_samples=n_samples, perturbations_per_eval=ibs, show_progress=False)
        return attr[0, :, 0].detach().float().cpu().numpy(), None

    def _kernelshap(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum.attr import KernelShap

        attr = KernelShap(self._forward).attribute(
            embeds, baselines=base, additional_forward_args=(mask,), feature_mask=self._feature_mask(embeds),
            n_samples=n_samples, perturbations_per_eval=ibs, show_progress=False)
        return attr[0, :, 0].detach().float().cpu().numpy(), None

    def _lime(self, embeds, base, mask, n_steps, n_samples, ibs):
        from captum._utils.models.linear_model import SkLearnLinearRegression
        from captum.attr import Lime

        attr = Lime(self._forward, interpretable_model=SkLearnLinearRegression()).attribute(
            embeds, baselines=base, additional_forward_args=(mask,), feature_mask=self._feature_mask(embeds),
            n_samples=n_samples, perturbations_per_eval=ibs, show_progress=False)
        return attr[0, :, 0].detach().float().cpu().numpy(), None

    # -- attention rollout ------------------------------------------------------------------------------
    def _rollout(self, embeds, base, mask, n_steps, n_samples, ibs):
        adapter = self.loaded.adapter
        refs = adapter.resolve("blocks.*.attn.pattern")
        if self._target.kind == "neuron":  # only the attention that runs before the neuron mixes its input
            block = re.match(r"blocks\.(\d+)(\.|$)", self._target.layer)
            if block is not None:
                refs = [ref for ref in refs if int(ref.name.split(".")[1]) <= int(block.group(1))]
            elif self._target.layer == "embed":
                refs = []
        with torch.no_grad(), adapter.attention_patterns(refs), Capture(refs) as cap:
            cap.run(self.model, inputs_embeds=embeds, attention_mask=mask)
        patterns = [cap.outputs[ref.name][0].float().cpu().numpy() for ref in refs]  # each (heads, q, k)
        if not patterns:  # a neuron of the embeddings: every position holds only its own token
            return np.eye(embeds.shape[1])[self._pos], None
        return attention_rollout(patterns)[self._pos], None

    # -- helpers --------------------------------------------------------------------------------------
    def _baseline_embeds(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        tokenizer = self.loaded.tokenizer
        special = torch.tensor([t in set(tokenizer.all_special_ids) for t in ids[0].tolist()], device=ids.device)
        if self.baseline == "zero":
            base = torch.zeros_like(embeds)
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            base = self.model.get_input_embeddings()(torch.full_like(ids, int(pad))).detach()
        keep = special.view(1, -1, 1)
        if self.baseline == "pad" and not bool(special.all()):
            base = torch.where(keep, embeds, base)
        return base

    def _position(self, n: int) -> int:
        position = self.position
        if not isinstance(position, int) or not -n <= position < n:
            raise ConfigError(f"position={position!r} is outside the prompt's {n} tokens; use 0..{n - 1} or -1..-{n}")
        return position % n

    def _one_ref(self, layer: str) -> Any:
        refs = self.loaded.adapter.resolve(layer)
        if len(refs) != 1:
            raise ConfigError(f"--layer {layer!r} names {len(refs)} layers; name exactly one, e.g. blocks.3")
        return refs[0]

    def _hidden_ref(self, layer: str, what: str) -> Any:
        """The one ref `layer` names, refused in one line when it holds attention weights (`what` uses it)."""
        ref = self._one_ref(layer)
        if ref.kind == "pattern":
            output = ref.name.removesuffix(".pattern")
            raise ConfigError(f"{ref.name} holds attention weights, which {what} cannot use: pick the attention "
                              f"output {output} or the block {output.removesuffix('.attn')}")
        return ref

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def attention_rollout(patterns: list[np.ndarray]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): how much each token's input reaches each position.

    patterns : per layer, attention weights of shape (heads, q, k), first layer first.
    Returns the (q, k) product of the layers' head-averaged attention with the residual added
    (0.5 * A + 0.5 * I, rows renormalised).
    """
    rollout = None
    for pattern in patterns:
        attn = pattern.mean(axis=0)
        attn = 0.5 * attn + 0.5 * np.eye(attn.shape[-1])
        attn = attn / attn.sum(axis=-1, keepdims=True)
        rollout = attn if rollout is None else attn @ rollout
    if rollout is None:
        raise ConfigError("the model has no attention patterns to roll out")
    return rollout


def _per_token(attr: torch.Tensor) -> np.ndarray:
    return attr[0].sum(dim=-1).detach().float().cpu().numpy()
