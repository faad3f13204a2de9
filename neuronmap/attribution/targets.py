"""What an attribution explains: one scalar per forward pass, parsed from a short spec.

Specs (the `--target` of `neuronmap attribute`):

``next-token``            logit of the token the model predicts at ``position`` on the real input
``token:<tok>``           logit of one token (a single-token string such as `` Paris`` or an id)
``logit-diff:<a>,<b>``    logit(a) - logit(b), the usual metric of a two-answer task
``class:<k>``             logit k of a classification head (outputs of shape (batch, classes))
``neuron:<layer>:<i>``    activation i of a canonical layer's output at ``position``

``position`` is a token index of the prompt; negative counts from the end (-1: the last token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..interventions._common import token_id
from ..token_ids import readable_token

KINDS = ("next-token", "token", "logit-diff", "class", "neuron")


@dataclass(frozen=True)
class Target:
    """A parsed target. ``tokens`` are vocabulary ids; ``layer``/``unit`` only for ``neuron``."""

    kind: str
    spec: str
    tokens: tuple[int, ...] = ()
    layer: str | None = None
    unit: int | None = None

    def describe(self, tokenizer: Any) -> str:
        names = [readable_token(tokenizer.convert_ids_to_tokens(t)) for t in self.tokens]
        if self.kind in ("next-token", "token"):
            return f"logit of {names[0]!r}"
        if self.kind == "logit-diff":
            return f"logit({names[0]!r}) - logit({names[1]!r})"
        if self.kind == "class":
            return f"class logit {self.unit}"
        return f"{self.layer}[{self.unit}]"


def parse_target(loaded: Any, spec: str, predicted: Callable[[], int] | None = None) -> Target:
    """Parse ``spec`` against the loaded model; ``predicted()`` gives the next-token id when needed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"target={spec!r} is empty; use one of {', '.join(KINDS)} (e.g. token:' Paris')")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind in ("next-token", "token", "logit-diff", "class"):
        from ..models.loading import require_trained

        require_trained(loaded, f"a {kind} target (read from its logits)",
                        "use a neuron: target, or a model with a trained language-model head")
    if kind == "next-token":
        if predicted is None:
            raise ConfigError("target next-token needs a model with an LM head")
        return Target(kind, spec, tokens=(int(predicted()),))
    if kind == "token":
        return Target(kind, spec, tokens=(token_id(loaded, _token_arg(rest), "target"),))
    if kind == "logit-diff":
        parts = _split_pair(rest, spec)
        return Target(kind, spec, tokens=(token_id(loaded, parts[0], "target"), token_id(loaded, parts[1], "target")))
    if kind == "class":
        return Target(kind, spec, unit=_index(rest, spec))
    if kind == "neuron":
        layer, _, unit = rest.rpartition(":")
        if not layer:
            raise ConfigError(f"target {spec!r}: write neuron:<layer>:<index>, e.g. neuron:blocks.3.mlp:17")
        loaded.adapter.resolve(layer)  # unknown layer -> one-line error listing valid names
        return Target(kind, spec, layer=layer, unit=_index(unit, spec))
    raise ConfigError(f"target kind {kind!r} is not known; use one of {', '.join(KINDS)} "
                      "(e.g. next-token, token:' Paris', logit-diff:' Mary',' John', neuron:blocks.3.mlp:17)")


def _token_arg(text: str) -> str | int:
    """A token as written after `token:` or in `logit-diff:`: quoted (`' Paris'`), a vocabulary id (`17`),
    or bare, spaces kept (`token: the` is " the", as `logit-diff: the, a` is " the" and " a")."""
    inner = text.strip()
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return inner[1:-1]
    if inner.isdigit():
        return int(inner)
    return text


def _split_pair(rest: str, spec: str) -> tuple[Any, Any]:
    parts = rest.split(",")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"target {spec!r}: write logit-diff:<answer>,<wrong>, e.g. logit-diff:' Mary',' John'")
    return _token_arg(parts[0]), _token_arg(parts[1])


def _index(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"target {spec!r}: {text!r} must be an integer index") from None
    if value < 0:
        raise ConfigError(f"target {spec!r}: index {value} must be >= 0")
    return value


def score(target: Target, logits: torch.Tensor | None, neuron: torch.Tensor | None, position: int) -> torch.Tensor:
    """The target's value per batch row from the model's logits (or the captured layer output)."""
    if target.kind == "neuron":
        assert neuron is not None
        if target.unit >= neuron.shape[-1]:
            raise ConfigError(f"target {target.spec!r}: {target.layer} has {neuron.shape[-1]} units; "
                              f"pick an index below {neuron.shape[-1]}")
        return neuron[:, position, target.unit]
    assert logits is not None
    if target.kind == "class":
        if logits.dim() != 2:
            raise ConfigError(f"target {target.spec!r} needs a classification head (logits of shape (batch, "
                              "classes)); this model predicts tokens: use token:, next-token or logit-diff:")
        if target.unit >= logits.shape[-1]:
            raise ConfigError(f"target {target.spec!r}: the head has {logits.shape[-1]} classes")
        return logits[:, target.unit]
    if logits.dim() != 3:
        raise ConfigError(f"target {target.spec!r} needs token logits; this model's head gives shape "
                          f"{tuple(logits.shape)}: use class:<k>")
    last = logits[:, position]
    if target.kind == "logit-diff":
        return last[:, target.tokens[0]] - last[:, target.tokens[1]]
    return last[:, target.tokens[0]]
