"""Question generation with a local transformers language model.

The model continues seed prompts (by default few-shot lists of questions ending in ``"Q:"``, so a
trained model writes one more question); each continuation is cut at its first line break, cleaned,
de-duplicated and length-filtered, until ``count`` distinct texts are collected. Sampling is seeded
(``torch.manual_seed(seed * 1000003 + batch)`` inside a forked RNG, so the caller's global RNG state
is untouched): the same model, prompts and seed give the same texts on the same device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from neuronmap.errors import ConfigError
from neuronmap.questions.filters import LengthFilter, UniqueTexts, check_count, clean_line
from neuronmap.questions.templates import check_seed

__all__ = ["default_local_prompts", "generate_local"]

_FEW_SHOT = {
    "science": ["Why is the sky blue?", "How do plants make food from sunlight?", "What is an atom made of?"],
    "history": ["Who was the first emperor of Rome?", "When did the Second World War end?",
                "Why did the Berlin Wall fall?"],
    "geography": ["What is the capital of France?", "Which river is the longest in Africa?",
                  "Where is Mount Kilimanjaro?"],
    "everyday life": ["How do I remove a coffee stain?", "What should I cook for dinner tonight?",
                      "How long should I sleep each night?"],
    "technology": ["How does a computer store data?", "What is a programming language?",
                   "Why does my phone battery drain so fast?"],
}


def default_local_prompts() -> list[tuple[str, str]]:
    """``(topic, prompt)`` pairs: three example questions on a topic, then ``"Q:"`` for the model."""
    return [(topic, "".join(f"Q: {q}\n" for q in examples) + "Q:") for topic, examples in _FEW_SHOT.items()]


def generate_local(model: Any, count: int, seed: int = 0, *, prompts: Sequence[str] | None = None,
                   max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 0.95,
                   min_words: int | None = None, max_words: int | None = None, batch_size: int = 8,
                   device: str = "auto", include_prompt: bool = False, max_batches: int | None = None) -> pd.DataFrame:
    """``count`` distinct texts sampled from a causal (or seq2seq) language model.

    Parameters
    ----------
    model : str, Path or LoadedModel
        Registry name, local folder or hub id (loaded with ``load_model(head=True)``), or a model
        already loaded with ``head=True``.
    count, seed : int
        How many distinct texts; the sampling seed.
    prompts : list of str, optional
        Seed prompts, cycled through; default: `default_local_prompts`.
    max_new_tokens, temperature, top_p
        Sampling settings; ``temperature=0`` decodes greedily (then few distinct texts exist).
    min_words, max_words : int, optional
        Length filter on the kept text, in words.
    include_prompt : bool
        Keep ``prompt + continuation`` as the text instead of the continuation's first line.
    max_batches : int, optional
        Give up after this many batches (default ``4 * ceil(count / batch_size) + 4``) with a
        ConfigError saying how many texts were found.

    Returns
    -------
    pandas.DataFrame
        ``text``, ``family="local"``, ``model``, ``source_prompt``, ``topic`` (default prompts only).
    """
    import torch

    from neuronmap.interventions._common import check_generation_length
    from neuronmap.models import load_model

    count, seed = check_count(count), check_seed(seed)
    check_count(max_new_tokens, "max_new_tokens")
    check_count(batch_size, "batch_size")
    length = LengthFilter(min_words, max_words)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"temperature={temperature!r} is invalid: pass a number >= 0 (0 decodes greedily)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p!r} is invalid: pass a number in (0, 1]")
    if prompts is None:
        topic_prompts: list[tuple[str | None, str]] = list(default_local_prompts())
    else:
        topic_prompts = [(None, p) for p in prompts]
        if not topic_prompts or not all(isinstance(p, str) and p.strip() for _, p in topic_prompts):
            raise ConfigError("prompts must be a non-empty list of non-blank strings: check --prompts")
    limit = check_count(max_batches, "max_batches") if max_batches is not None else 4 * -(-count // batch_size) + 4

    loaded = model if hasattr(model, "model") and hasattr(model, "tokenizer") else \
        load_model(model, device=device, head=True)
    lm, tokenizer = loaded.model, loaded.tokenizer
    encoder_decoder = bool(getattr(lm.config, "is_encoder_decoder", False))
    if not (hasattr(lm, "can_generate") and lm.can_generate()):
        raise ConfigError(f"model {loaded.name!r} ({type(lm).__name__}) cannot generate text: pass a causal "
                          "language model (GPT-2, Llama, Qwen2, ...) or a seq2seq model (T5) to --model")
    longest = max((p for _, p in topic_prompts), key=lambda p: len(tokenizer(p)["input_ids"]))
    check_generation_length(loaded, len(tokenizer(longest)["input_ids"]), max_new_tokens,
                            what=f"seed prompt {longest[:40]!r}")
    generation: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        generation.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        generation.update(do_sample=False)

    found = UniqueTexts(length)
    devices = [lm.device] if lm.device.type == "cuda" else []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models must see every prompt end at the same position
    try:
        for batch_index in range(limit):
            start = batch_index * batch_size
            batch = [topic_prompts[(start + i) % len(topic_prompts)] for i in range(batch_size)]
            inputs = tokenizer([p for _, p in batch], return_tensors="pt", padding=True).to(lm.device)
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed * 1_000_003 + batch_index)
                output = lm.generate(**inputs, **generation)
            new = output if encoder_decoder else output[:, inputs["input_ids"].shape[1]:]
            for (topic, prompt), ids in zip(batch, new, strict=True):
                continuation = tokenizer.decode(ids, skip_special_tokens=True)
                if include_prompt:
                    text = (prompt + continuation).strip()
                else:
                    lines = [line for line in continuation.splitlines() if line.strip()] or [""]
                    text = clean_line(lines[0])
                labels: dict[str, Any] = {"family": "local", "model": loaded.name, "source_prompt": prompt}
                if prompts is None:
                    labels["topic"] = topic
                found.add(text, **labels)
                if len(found) == count:
                    return found.frame()
    finally:
        tokenizer.padding_side = old_side
    raise ConfigError(f"model {loaded.name!r} gave only {len(found)} distinct texts{length.describe()} in {limit} "
                      f"batches of {batch_size} (asked for {count}): raise --max-new-tokens or --temperature, "
                      f"pass more --prompts{', widen --min-words/--max-words' if length.describe() else ''} "
                      "or lower --count")
