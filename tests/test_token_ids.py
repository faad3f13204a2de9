"""`token_ids.ids_encoder`: the tokenizer's own ids, through the fast backend where it can."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from neuronmap import extraction, token_ids
from neuronmap.models.tiny import TINY_FAMILIES

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "  leading spaces,\ttabs and UNUSUAL Capitals  ",
    "Numbers like 12345 and 678, émigré café naïve, 東京, emoji 🙂.",
    "A",
    "What did the committee decide after three long hours of debate about the budget?" * 3,
    "special-looking text: <s> </s> [CLS] [SEP] <pad> <|endoftext|>",
]


def reference_ids(tokenizer, texts, max_length, truncate=True):
    """One plain transformers call per prompt: the independent reference."""
    options = dict(truncation=True, max_length=max_length) if truncate else dict(truncation=False)
    return [tokenizer(text, **options)["input_ids"] for text in texts]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("max_length", [6, 512])
def test_ids_and_truncation_counts_equal_the_tokenizers(family, max_length, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))
    texts = TEXTS * 150  # more than one 1,024-prompt batch
    reported = []  # what a progress bar is told
    tokens = extraction.tokenize_prompts(tokenizer, texts, max_length=max_length, on_batch=reported.append)
    assert reported == [1024, len(texts) - 1024]
    expected = reference_ids(tokenizer, TEXTS, max_length) * 150
    assert [seq.tolist() for seq in tokens.ids] == expected
    full = reference_ids(tokenizer, TEXTS, max_length, truncate=False) * 150
    assert tokens.n_truncated == sum(len(seq) > max_length for seq in full)
    backend = token_ids._backend_encoder(tokenizer, max_length)  # the fast path itself, not its fallback
    assert backend is not None
    assert backend(TEXTS, True) == expected[: len(TEXTS)] and backend(TEXTS, False) == full[: len(TEXTS)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_ids_counts_and_order(family, threads, tiny_model_dir, tmp_path):
    """Batches encoded on threads (truncation off on a copy of the tokenizer, never on the shared one)
    give, in order, what one plain call per prompt gives; in memory and spilled to a file."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))
    texts = [f"{text} {i}" for i in range(60) for text in TEXTS]  # every prompt distinct: order shows
    batches = [texts[i : i + 13] for i in range(0, len(texts), 13)]  # many batches, several per thread
    expected = reference_ids(tokenizer, texts, 8)
    full = reference_ids(tokenizer, texts, 8, truncate=False)
    reported = []
    tokens = extraction.tokenize_batches(tokenizer, iter(batches), 8, threads=threads, on_batch=reported.append)
    spilled = extraction.tokenize_batches(tokenizer, iter(batches), 8, spill=tmp_path / "ids", threads=threads)
    for result in (tokens, spilled):
        assert [list(seq) for seq in result.ids] == expected
        assert result.n_truncated == sum(len(seq) > 8 for seq in full) > 0
    assert reported == [len(batch) for batch in batches]
    # the shared tokenizer was left truncating as the call sets it: the untruncated passes used a copy
    assert reference_ids(tokenizer, texts[:20], 8) == expected[:20]


def test_a_failing_batch_on_a_thread_raises_and_stops(tiny_model_dir, monkeypatch):
    """An error in one batch reaches the caller; no thread keeps encoding after it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    seen = []

    def batches():
        for i in range(100):
            seen.append(i)
            yield ["boom"] if i == 5 else TEXTS

    original = token_ids.ids_encoder

    def failing(tok, max_length):
        encode = original(tok, max_length)
        return lambda texts, truncate: (_ for _ in ()).throw(RuntimeError("bad batch")) if texts == ["boom"] \
            else encode(texts, truncate)

    monkeypatch.setattr(token_ids, "ids_encoder", failing)
    with pytest.raises(RuntimeError, match="bad batch"):
        extraction.tokenize_batches(tokenizer, batches(), 512, threads=2)
    assert len(seen) <= 5 + 2 * 2 + 1  # read ahead at most 2 batches per thread past the failing one


def test_the_packaged_minilm_tokenizer_gives_its_own_ids():
    from neuronmap.models import load_model

    tokenizer = load_model("all-minilm-l6-v2", device="cpu").tokenizer
    encode = token_ids.ids_encoder(tokenizer, 16)
    assert encode(TEXTS, True) == reference_ids(tokenizer, TEXTS, 16)
    assert encode(TEXTS, False) == reference_ids(tokenizer, TEXTS, 16, truncate=False)


def test_a_backend_that_disagrees_with_the_call_is_not_used(tiny_model_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    real = token_ids._backend_encoder

    def shifted(tok, max_length):  # a backend path that gets the ids wrong
        encode = real(tok, max_length)
        return lambda texts, truncate: [[i + 1 for i in ids] for ids in encode(texts, truncate)]

    monkeypatch.setattr(token_ids, "_backend_encoder", shifted)
    encode = token_ids.ids_encoder(tokenizer, 512)
    assert encode(TEXTS, True) == reference_ids(tokenizer, TEXTS, 512)
    assert encode(TEXTS[::-1], True) == reference_ids(tokenizer, TEXTS[::-1], 512)  # and stays off


def test_a_tokenizer_class_that_changes_the_call_is_called(tiny_model_dir):
    base = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))

    class Lowercasing(type(base)):
        def __call__(self, text, *args, **kwargs):
            lowered = [t.lower() for t in text] if isinstance(text, list) else text.lower()
            return super().__call__(lowered, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer.__class__ = Lowercasing
    assert token_ids._backend_encoder(tokenizer, 512) is None
    assert token_ids.ids_encoder(tokenizer, 512)(TEXTS, True) == reference_ids(base, [t.lower() for t in TEXTS], 512)


def test_a_backend_path_that_raises_falls_back_to_the_call(tiny_model_dir, monkeypatch):
    """Another transformers version may lack the internals the fast path uses: the call still works."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))

    def broken(texts, truncate):
        raise TypeError("set_truncation_and_padding() got an unexpected keyword argument 'padding_side'")

    monkeypatch.setattr(token_ids, "_backend_encoder", lambda tok, max_length: broken)
    assert token_ids.ids_encoder(tokenizer, 8)(TEXTS, True) == reference_ids(tokenizer, TEXTS, 8)
