"""Pieces every intervention shares: tokens, targets, batched forwards, metrics and editing hooks.

Why one module: the family promises one argument vocabulary (``inputs``, ``baselines``, ``target``,
``layers``) and the same one-line errors for the same mistakes (a target that is not one token, prompts
of different token lengths, a layer the model lacks), so the checks live in one place.

The editing hook (`edit_activation`) is the only way these methods change a forward: a context manager
that registers one hook on the module a `LayerRef` names and removes it on exit, also when the forward
raises. It handles tuple outputs (Hugging Face blocks keep their other items), input hooks (`embed`, the
attention output projection's input for heads) and OPT's flat MLP rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..models.adapter import select_first, select_hidden_input
from ..token_ids import readable_token

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------ model
def check_stack(loaded: Any, method: str) -> None:
    """Interventions read the logits of one stack: decoder-only and encoder models, not encoder-decoders."""
    adapter = loaded.adapter
    if adapter.is_encoder_decoder or adapter.stacks != [""]:
        raise ConfigError(f"model {adapter.name} is {adapter.family} with stacks {adapter.stacks}: {method} "
                          "supports decoder-only and encoder models; use one of those (GPT-2, Llama, BERT, ...)")


def is_causal_lm(loaded: Any) -> bool:
    """True for a next-token model (GPT-2, Llama, ...); False for masked LMs (BERT) and base models."""
    model = loaded.model
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def position_limit(loaded: Any) -> int | None:
    """Positions the model can attend over (``max_position_embeddings`` / ``n_positions``), None when unbounded."""
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


def check_generation_length(loaded: Any, prompt_tokens: int, max_new_tokens: int, option: str = "--max-new-tokens",
                            what: str = "the prompt") -> None:
    """Refuse a generation that runs past the model's positions (it fails deep in the model's embedding otherwise).

    A decoder-only model holds the prompt and the new tokens in one sequence; an encoder-decoder model's
    decoder holds only the new tokens (after its start token) and its encoder only the prompt.
    """
    limit = position_limit(loaded)
    if not limit:
        return
    if getattr(loaded.model.config, "is_encoder_decoder", False):
        if prompt_tokens > limit:
            raise ConfigError(f"{what} has {prompt_tokens} tokens but the model has {limit} positions: "
                              "shorten the prompt")
        if max_new_tokens + 1 > limit:
            raise ConfigError(f"{option} {max_new_tokens} needs {max_new_tokens + 1} decoder positions but the model "
                              f"has {limit}: use {option} <= {limit - 1}")
        return
    if prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"use {option} <= {room}" if room >= 1 else "shorten the prompt"
        raise ConfigError(f"{what} ({prompt_tokens} tokens) plus {option} {max_new_tokens} needs "
                          f"{prompt_tokens + max_new_tokens} positions but the model has {limit}: {fix}")


def check_prompt_length(loaded: Any, n_tokens: int) -> None:
    """Refuse a prompt longer than the model's positions (encoder-decoder models are not bounded here)."""
    limit = position_limit(loaded)
    if limit and n_tokens > limit and not getattr(loaded.model.config, "is_encoder_decoder", False):
        raise ConfigError(f"a prompt has {n_tokens} tokens but the model has {limit} positions: shorten it to at most "
                          f"{limit} tokens")


def check_run_model(opened: Any, loaded: Any, fix: str) -> None:
    """A stored run must come from the loaded model (same config hash), else a ConfigError naming both and `fix`."""
    expected = getattr(loaded, "config_hash", None)
    stored = opened.manifest.config_hash
    if expected and stored and stored != expected:
        raise ConfigError(f"run {opened.path} was extracted from {opened.manifest.model} (config {stored[:12]}), not "
                          f"from {loaded.name} (config {expected[:12]}): {fix}")


def device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    return int(batch_size)


# ----------------------------------------------------------------------------------------------- tokens
def as_prompts(inputs: Any, what: str = "inputs") -> list[str]:
    """A prompt or a list of prompts -> list of non-empty strings."""
    prompts = [inputs] if isinstance(inputs, str) else list(inputs) if inputs is not None else []
    if not prompts:
        raise ConfigError(f"{what} is empty: give at least one prompt")
    for text in prompts:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{what} holds {text!r}: every prompt must be a non-empty string")
    return prompts


def tokenize(loaded: Any, text: str) -> list[int]:
    """Token ids of one prompt, with the special tokens the tokenizer adds (as the model saw them in training);
    a prompt longer than the model's positions is refused (`check_prompt_length`)."""
    ids = list(loaded.tokenizer(text)["input_ids"])
    check_prompt_length(loaded, len(ids))
    return ids


def token_id(loaded: Any, token: str | int, what: str) -> int:
    """A single-token string (" Paris") or an id in the vocabulary -> the id; anything else a one-line error."""
    tokenizer = loaded.tokenizer
    vocab = max(len(tokenizer), int(getattr(loaded.model.config, "vocab_size", 0) or 0))
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < vocab:
            raise ConfigError(f"{what} token id {int(token)} must be in [0, {vocab}) (the vocabulary size)")
        return int(token)
    if not isinstance(token, str) or not token:
        raise ConfigError(f"{what}={token!r} must be a token string or id")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{what} {token!r} is {len(ids)} tokens {pieces}, not one token of the vocabulary: "
                          "pass a single token (mind the leading space, e.g. ' Paris') or a token id")
    return int(ids[0])


def target_pair(loaded: Any, target: Any) -> tuple[int, int]:
    """``(answer, wrong)`` -> two token ids."""
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise ConfigError(f"target={target!r} must be a pair (answer, wrong) of tokens or token ids")
    answer, wrong = token_id(loaded, target[0], "answer"), token_id(loaded, target[1], "wrong")
    if answer == wrong:
        piece = readable_token(loaded.tokenizer.convert_ids_to_tokens(answer))
        raise ConfigError(f"answer and wrong are the same token {piece!r} (id {answer}), so their logit difference "
                          "is always 0: give two different tokens")
    return answer, wrong


@dataclass
class Batch:
    """Right-padded token ids of several prompts.

    ids, mask : LongTensor of shape (batch, seq)
    lengths : LongTensor of shape (batch,)
    loss_mask : BoolTensor of shape (batch, seq) or None
        Which positions' next-token predictions count in the loss (default: every real position but the last).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    loss_mask: torch.Tensor | None = None

    @property
    def last(self) -> torch.Tensor:
        return self.lengths - 1

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: Sequence[int] | torch.Tensor) -> "Batch":
        index = torch.as_tensor(index, dtype=torch.long)
        return Batch(self.ids[index], self.mask[index], self.lengths[index],
                     None if self.loss_mask is None else self.loss_mask[index])

    def repeat(self, times: int) -> "Batch":
        return Batch(self.ids.repeat(times, 1), self.mask.repeat(times, 1), self.lengths.repeat(times),
                     None if self.loss_mask is None else self.loss_mask.repeat(times, 1))


def make_batch(loaded: Any, sequences: Sequence[Sequence[int]]) -> Batch:
    """Pad token-id lists on the right with the tokenizer's pad id (attention mask 0 there).

    A sequence longer than the model's positions is refused here, where every method builds its
    batches: it would fail deep in the embedding, and truncating it would change the experiment.
    """
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    check_prompt_length(loaded, width)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return Batch(ids, mask, torch.as_tensor(lengths, dtype=torch.long))


def prompt_batch(loaded: Any, prompts: Sequence[str]) -> Batch:
    return make_batch(loaded, [tokenize(loaded, p) for p in prompts])


def same_lengths(loaded: Any, first: Sequence[str], second: Sequence[str], first_name: str,
                 second_name: str) -> None:
    """Position-aligned methods need every pair to tokenise to the same length; else a one-line error."""
    for a, b in zip(first, second):
        na, nb = len(tokenize(loaded, a)), len(tokenize(loaded, b))
        if na != nb:
            raise ConfigError(f"{first_name} prompt {a!r} has {na} tokens but {second_name} prompt {b!r} has {nb}: "
                              "this method pairs positions, so reword one prompt to the same token length")


def run_logits(loaded: Any, batch: Batch) -> torch.Tensor:
    """Full logits (batch, seq, vocab) in float32 of a forward on `batch` (grad mode: the caller's)."""
    from ..models.loading import require_trained

    require_trained(loaded, "its logits")
    model = loaded.model
    device = device_of(model)
    output = model(input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device), use_cache=False)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ConfigError(f"model {loaded.name} returned no logits: load it with head=True")
    return logits.float()


def last_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(batch, vocab): the logits at each row's last real token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.last.to(logits.device)]


def token_losses(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy and the number of predictions counted: (batch,), (batch,)."""
    ids = batch.ids.to(logits.device)
    counted = batch.mask.bool().to(logits.device).clone()
    counted[:, :-1] &= batch.mask[:, 1:].bool().to(logits.device)  # the last real token predicts nothing
    counted[:, -1] = False
    if batch.loss_mask is not None:
        counted &= batch.loss_mask.to(logits.device)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    keep = counted[:, :-1]
    return (nll * keep).sum(dim=1), keep.sum(dim=1)


class Metric:
    """What an intervention is scored by.

    ``kind``: "loss" (mean next-token cross-entropy over the counted predictions of every row: causal LMs),
    "logit_diff" (``logit[answer] - logit[wrong]`` at each row's last token, mean over rows) or "logprob"
    (log-probability of ``answer`` at the last token, mean over rows).
    """

    def __init__(self, kind: str, answer: int | None = None, wrong: int | None = None) -> None:
        self.kind, self.answer, self.wrong = kind, answer, wrong

    @classmethod
    def from_target(cls, loaded: Any, target: Any) -> "Metric":
        if target is None:
            if not is_causal_lm(loaded):
                raise ConfigError(f"model {loaded.name} is not a next-token model, so it has no next-token loss: "
                                  "pass target=(answer, wrong) (--answer/--wrong) to score by a logit difference")
            return cls("loss")
        if isinstance(target, (tuple, list)):
            return cls("logit_diff", *target_pair(loaded, target))
        return cls("logprob", token_id(loaded, target, "answer"))

    @property
    def label(self) -> str:
        return {"loss": "loss", "logit_diff": "logit difference", "logprob": "log-probability"}[self.kind]

    def parts(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over rows, count) so that chunks of a batch combine exactly into the mean."""
        if self.kind == "loss":
            total, count = token_losses(logits, batch)
            return total.sum(), count.sum()
        last = last_logits(logits, batch)
        if self.kind == "logit_diff":
            values = last[:, self.answer] - last[:, self.wrong]
        else:
            values = torch.log_softmax(last, dim=-1)[:, self.answer]
        return values.sum(), torch.tensor(values.shape[0], device=values.device)

    def per_row(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The metric of each row: (batch,)."""
        if self.kind == "loss":
            total, count = token_losses(logits, batch)
            return total / count.clamp(min=1)
        last = last_logits(logits, batch)
        if self.kind == "logit_diff":
            return last[:, self.answer] - last[:, self.wrong]
        return torch.log_softmax(last, dim=-1)[:, self.answer]

    def summary(self, loaded: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.kind}
        tokens = loaded.tokenizer.convert_ids_to_tokens
        if self.answer is not None:
            out.update(answer=self.answer, answer_token=tokens(self.answer))
        if self.wrong is not None:
            out.update(wrong=self.wrong, wrong_token=tokens(self.wrong))
        return out


def evaluate(loaded: Any, batch: Batch, metric: Metric, batch_size: int) -> float:
    """The metric over `batch`, run in chunks of `batch_size` rows (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            chunk = batch.rows(range(start, min(start + batch_size, len(batch))))
            value, n = metric.parts(run_logits(loaded, chunk), chunk)
            total += float(value)
            count += int(n)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------- layers
def hidden_refs(loaded: Any, layers: str | Sequence[str], what: str) -> list:
    """Resolve `layers` to hidden-kind refs (never attention patterns, which no method here edits)."""
    refs = loaded.adapter.resolve(layers)
    bad = [ref.name for ref in refs if ref.kind != "hidden"]
    if bad:
        raise ConfigError(f"{what} edits hidden states; {', '.join(bad)} is an attention pattern (layers={layers!r}); "
                          "use e.g. blocks.*, blocks.*.mlp or blocks.*.attn")
    return refs


@contextmanager
def edit_activation(ref: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, every forward replaces `ref`'s tensor T (batch, seq, *feature) by ``fn(T)``.

    `fn` must return a tensor of T's shape (it may edit a clone). Output hooks keep the other items of a
    tuple output; input hooks (`embed`, a head site) replace the ``hidden_states`` keyword or the first
    positional argument. Removed on exit, also on error.
    """
    handles = []
    try:
        if ref.prepare is not None:
            handles.append(ref.prepare())
        if ref.hook == "input":
            def pre_hook(_module, args, kwargs):
                if "hidden_states" in kwargs:
                    kwargs = {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
                    return args, kwargs
                return (fn(args[0]), *args[1:]), kwargs

            handles.append(ref.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(_module, _args, output):
                hidden = select_first(output)
                view = ref.select(output)
                new = fn(view).reshape(hidden.shape)
                if isinstance(output, tuple):
                    return (new, *output[1:])
                if isinstance(output, list):
                    return [new, *output[1:]]
                return new

            handles.append(ref.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def select_input(*args_kwargs: Any) -> torch.Tensor:
    """The first input of a module call (an out projection's input): used as a `LayerRef.select`."""
    return select_hidden_input(*args_kwargs)
