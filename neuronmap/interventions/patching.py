"""Activation patching of the residual stream, per layer and position, with a logit-difference metric.

Run the model on a *clean* prompt (answer: `answer`) and on a *corrupted* prompt of the same token length
(which favours `wrong`), then re-run the corrupted prompt once per (layer, position) with the residual
stream after block `layer` (`blocks.{i}`) at `position` replaced by its clean value. The metric is the
logit difference ``logit[answer] - logit[wrong]`` at the last position; a cell that moves it back to the
clean value marks a state that carries the information the corruption removed.

Vocabulary (shared by the intervention family, Captum's names): ``inputs`` = the clean prompt,
``baselines`` = the corrupted prompt, ``target`` = ``(answer, wrong)`` tokens, ``layers`` = a layer spec
(`blocks.*` by default). Every hook is removed on exit, also when a forward raises.

Example
-------
>>> loaded = load_model("gpt2", head=True)                                            # doctest: +SKIP
>>> result = ActivationPatching(loaded).attribute(
...     "When Mary and John went to the store, John gave a drink to",
...     baselines="When Mary and John went to the store, Mary gave a drink to",
...     target=(" Mary", " John"))                                                     # doctest: +SKIP
>>> result.logit_diff.shape          # (n_layers, n_positions)                         # doctest: +SKIP
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import check_prompt_length, target_pair

BLOCK = re.compile(r"^blocks\.\d+$")


@contextmanager
def patch_output(ref: Any, values: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """While inside, the output of `ref`'s module has row b, position ``positions[b]`` set to ``values[b]``.

    Parameters
    ----------
    ref : LayerRef
        An output-hooked layer whose module returns a tensor or a tuple whose first item is the tensor
        (Hugging Face blocks); the replacement keeps the rest of the tuple.
    values : Tensor of shape (batch, d)
        Replacement vectors, one per row of the batch.
    positions : LongTensor of shape (batch,)
        Sequence position patched in each row.
    """
    if ref.hook != "output":
        raise ConfigError(f"layer {ref.name!r} is hooked on its input; patch a block output (blocks.N)")
    rows = torch.arange(len(positions))

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        patched = hidden.clone()
        patched[rows.to(hidden.device), positions.to(hidden.device)] = values.to(hidden.device, hidden.dtype)
        if isinstance(output, tuple):
            return (patched, *output[1:])
        if isinstance(output, list):
            return [patched, *output[1:]]
        return patched

    handle = ref.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PatchingResult:
    """Activation patching of one clean / corrupted pair.

    logit_diff : ndarray of shape (n_layers, n_positions)
        ``logit[answer] - logit[wrong]`` at the last position of the corrupted prompt with the residual
        stream after `layers[i]` at position j restored to its clean value.
    restored : ndarray of shape (n_layers, n_positions)
        ``(logit_diff - corrupted_diff) / (clean_diff - corrupted_diff)``: 1 = fully restored, 0 = no
        effect (NaN when the two prompts give the same difference).
    """

    layers: list[str]
    tokens: list[str]
    corrupted_tokens: list[str]
    answer: int
    wrong: int
    clean_diff: float
    corrupted_diff: float
    logit_diff: np.ndarray
    restored: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        span = self.clean_diff - self.corrupted_diff
        with np.errstate(invalid="ignore", divide="ignore"):
            self.restored = (self.logit_diff - self.corrupted_diff) / span if span != 0 else \
                np.full_like(self.logit_diff, np.nan)

    def summary(self) -> dict[str, Any]:
        """JSON-able metrics (matrices left out: store `logit_diff` / `restored` as arrays)."""
        best = np.unravel_index(np.nanargmax(np.abs(self.logit_diff - self.corrupted_diff)), self.logit_diff.shape)
        return {"layers": self.layers, "tokens": self.tokens, "corrupted_tokens": self.corrupted_tokens,
                "answer": self.answer, "wrong": self.wrong, "clean_logit_diff": self.clean_diff,
                "corrupted_logit_diff": self.corrupted_diff, "shape": list(self.logit_diff.shape),
                "max_effect": {"layer": self.layers[best[0]], "position": int(best[1]),
                               "logit_diff": float(self.logit_diff[best])}}


class ActivationPatching:
    """Residual-stream activation patching on a model loaded with ``load_model(..., head=True)``.

    Parameters
    ----------
    loaded : LoadedModel
        Needs logits: load with ``head=True``. Decoder-only and encoder models (the metric reads the
        logits of the last position).
    batch_size : int
        Patched forwards run together (one row per patched position).
    """

    def __init__(self, loaded: Any, batch_size: int = 32) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    # -- the verb --------------------------------------------------------------------------------
    def attribute(self, inputs: str, baselines: str, target: tuple[str | int, str | int],
                  layers: str | Sequence[str] = "blocks.*", positions: str = "each") -> PatchingResult:
        """Patch clean states (from `inputs`) into the corrupted run (`baselines`), layer by position.

        Parameters
        ----------
        inputs : str
            The clean prompt.
        baselines : str
            The corrupted prompt; must tokenise to as many tokens as `inputs`.
        target : (answer, wrong)
            Tokens of the logit difference: a string that is exactly one token (mind the leading space,
            " Mary") or a token id.
        layers : str or list of str
            Residual-stream layers (`blocks.N`, globs or ranges: `blocks.*`, `blocks.2-5`).
        positions : "each" | "all"
            "each": one column per token position; "all": one column, every position patched at once.

        Returns
        -------
        PatchingResult
        """
        batch_size = self._validate_batch_size()
        if positions not in ("each", "all"):
            raise ConfigError(f"positions={positions!r} must be one of each, all")
        adapter = self.loaded.adapter
        if adapter.is_encoder_decoder or adapter.stacks != [""]:
            raise ConfigError(f"model {adapter.name} is {adapter.family} with stacks {adapter.stacks}: activation "
                              "patching supports decoder-only and encoder models")
        clean_ids, corrupted_ids = self._tokenize(inputs), self._tokenize(baselines)
        if clean_ids.shape[1] != corrupted_ids.shape[1]:
            raise ConfigError(f"clean prompt has {clean_ids.shape[1]} tokens but corrupted prompt has "
                              f"{corrupted_ids.shape[1]}: patching pairs positions, so reword one prompt to the "
                              "same token length")
        answer, wrong = target_pair(self.loaded, target)
        refs = self._block_refs(layers)
        n = clean_ids.shape[1]

        with torch.no_grad(), Capture(refs) as capture:
            clean_logits = capture.run(self._logits, clean_ids)
            clean_states = dict(capture.outputs)
        with torch.no_grad():
            corrupted_logits = self._logits(corrupted_ids)
            columns = [torch.arange(n)] if positions == "all" else [torch.tensor([p]) for p in range(n)]
            matrix = np.empty((len(refs), len(columns)), dtype=np.float64)
            for i, ref in enumerate(refs):
                clean = clean_states[ref.name][0]  # (seq, d)
                matrix[i] = self._patch_columns(ref, clean, corrupted_ids, columns, answer, wrong, batch_size)

        tokenizer = self.loaded.tokenizer
        return PatchingResult(
            layers=[ref.name for ref in refs],
            tokens=tokenizer.convert_ids_to_tokens(clean_ids[0].tolist()),
            corrupted_tokens=tokenizer.convert_ids_to_tokens(corrupted_ids[0].tolist()),
            answer=answer, wrong=wrong, clean_diff=_diff(clean_logits, answer, wrong)[0],
            corrupted_diff=_diff(corrupted_logits, answer, wrong)[0], logit_diff=matrix)

    # -- pieces ------------------------------------------------------------------------------------
    def _patch_columns(self, ref, clean: torch.Tensor, corrupted_ids: torch.Tensor, columns: list[torch.Tensor],
                       answer: int, wrong: int, batch_size: int) -> np.ndarray:
        """Logit difference for each column (a set of positions patched together)."""
        if len(columns) == 1:  # every position at once: one row
            cols = columns[0]
            with _patch_many(ref, clean[cols], cols):
                return np.asarray(_diff(self._logits(corrupted_ids), answer, wrong))
        out = []
        positions = torch.cat(columns)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            ids = corrupted_ids.expand(len(chunk), -1)
            with patch_output(ref, clean[chunk], chunk):
                out.extend(_diff(self._logits(ids), answer, wrong))
        return np.asarray(out)

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ..models.loading import require_trained

        require_trained(self.loaded, "its logits")
        model = self.loaded.model
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ConfigError(f"model {self.loaded.name} returned no logits: load it with head=True")
        return logits[:, -1].float()

    def _tokenize(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"prompt {text!r} must be a non-empty string")
        ids = self.loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        check_prompt_length(self.loaded, ids.shape[-1])
        return ids

    def _block_refs(self, layers: str | Sequence[str]) -> list:
        refs = self.loaded.adapter.resolve(layers)
        bad = [ref.name for ref in refs if not BLOCK.match(ref.name)]
        if bad:
            raise ConfigError(f"activation patching patches the residual stream blocks.N; {', '.join(bad)} is not one"
                              f" (layers={layers!r}); use e.g. blocks.* or blocks.0-3")
        return refs

    def _validate_batch_size(self) -> int:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        return self.batch_size


@contextmanager
def _patch_many(ref: Any, values: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """One row with several positions patched: `values` (k, d) at `positions` (k,)."""
    if ref.hook != "output":
        raise ConfigError(f"layer {ref.name!r} is hooked on its input; patch a block output (blocks.N)")

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        patched = hidden.clone()
        patched[:, positions.to(hidden.device)] = values.to(hidden.device, hidden.dtype)
        return (patched, *output[1:]) if isinstance(output, (tuple, list)) else patched

    handle = ref.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _diff(logits: torch.Tensor, answer: int, wrong: int) -> list[float]:
    """logit[answer] - logit[wrong] per row of (batch, vocab) logits."""
    return (logits[:, answer] - logits[:, wrong]).double().cpu().tolist()
