"""Attribution of a model's output to its input tokens (saliency, integrated gradients, Shapley, ...).

>>> from neuronmap.attribution import TokenAttribution                       # doctest: +SKIP
>>> result = TokenAttribution(loaded).attribute("The capital of France is", target="token: Paris",
...                                             method="ig")                # doctest: +SKIP
>>> result.tokens, result.scores, result.delta                              # doctest: +SKIP
"""

from .methods import METHODS, AttributionResult, TokenAttribution, attention_rollout
from .targets import Target, parse_target

__all__ = ["METHODS", "AttributionResult", "TokenAttribution", "Target", "attention_rollout", "parse_target"]
