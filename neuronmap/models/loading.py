"""Load a model and its tokenizer by local folder, registry name or hub id.

Resolution order: an existing local folder -> a registry entry (its ``local_package`` first when it is
importable, else its hub id) -> any other string as a hub id. Loading always goes through
``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``, so whatever transformers can load,
NeuronMap can. Names that resolve to nothing raise ``UnknownModelError`` with close registry names.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from neuronmap.errors import ConfigError, UnknownModelError
from neuronmap.models.registry import ModelEntry, get_entry, suggest

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "camembert", "deberta",
                 "deberta-v2", "mpnet", "modernbert", "ernie"}
# Keys that describe where or how a config was loaded, not the model: left out of config_hash.
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
                  "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal"}


@dataclass
class LoadedModel:
    """A model ready for extraction: in ``eval()`` mode, on ``device``, with a padding tokenizer.

    ``source`` is what ``from_pretrained`` was given (a folder or a hub id); ``name`` the registry name
    when there is one, else the string the user passed. ``config_hash`` is the sha256 of the config
    JSON without load-time keys (path, transformers version, dtype, attention implementation).
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    family: str
    device: str
    dtype: str
    config_hash: str
    untrained: tuple[str, ...] = ()  # weights the checkpoint lacked, initialised at random when loading

    @cached_property
    def adapter(self):
        from neuronmap.models.adapter import ModelAdapter

        return ModelAdapter(self.model, name=self.name)


def load_model(name_or_path: str | Path, device: str = "auto", dtype: str = "auto", head: bool = False,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer.

    Parameters
    ----------
    name_or_path : str or Path
        Local folder (``save_pretrained`` layout), registry name (``neuronmap models list``) or hub id.
    device : str
        ``"auto"`` (CUDA when available, else CPU) or any torch device string.
    dtype : {"auto", "float32", "float16", "bfloat16"}
        ``"auto"`` keeps the checkpoint's dtype on CUDA and uses float32 on CPU (half precision on CPU is
        slow and some kernels lack it).
    head : bool
        False loads the base model (``AutoModel``); True the model with its LM head (causal LM,
        masked LM or seq2seq LM, by the model's kind).
    attn_implementation : str, optional
        Passed to ``from_pretrained`` (``"eager"``, ``"sdpa"``, ...); None keeps transformers' default.
    """
    if dtype not in ("auto", *DTYPES):
        raise ConfigError(f"dtype {dtype!r} is not supported: use auto, float32, float16 or bfloat16")
    target = _device(device)
    name, source, entry, offline = resolve_source(name_or_path)
    config = _load_config(name, source, entry, offline)

    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    kind = entry.kind if entry else infer_kind(config)
    auto = AutoModel
    if head:
        auto = {"decoder": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM,
                "encoder-decoder": AutoModelForSeq2SeqLM}[kind]
    if dtype == "auto":
        torch_dtype: Any = "auto" if target.type == "cuda" else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "output_loading_info": True, "local_files_only": bool(offline)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_load_report():
        try:
            model, info = auto.from_pretrained(source, config=config, **kwargs)
        except _weight_errors() as exc:
            if isinstance(exc, RuntimeError) and not _is_checkpoint_problem(exc):
                raise
            where = repr(source) if name == source else f"{name!r} from {source!r}"
            raise ConfigError(f"cannot load the weights of {where}: {_first_sentence(exc)}; "
                              "save the model again with model.save_pretrained(folder) or download it again") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        warnings.warn(f"{name}: {len(missing)} weights are not in the checkpoint and were initialised at random "
                      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})", stacklevel=2)
    model.to(target).eval()
    tokenizer = _load_tokenizer(name, source, bool(offline))
    param = next(model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       family=getattr(config, "model_type", "") or (entry.family if entry else ""),
                       device=str(param.device), dtype=str(param.dtype).removeprefix("torch."),
                       config_hash=config_hash(config), untrained=tuple(missing))


def layer_names(name_or_path: str | Path, layers: str, config: Any = None) -> list[str]:
    """The canonical layers `layers` selects in a model, from its config alone (no weights are read).

    Why: a plan (a YAML experiment) can name an unknown model or layer; found only when extraction
    loads the weights, the mistake costs minutes and leaves folders behind. Raises what `load_model` and
    the adapter raise: UnknownModelError, UnknownLayerError. With `config`, that config is used as is.
    """
    from transformers import AutoModel

    from .adapter import ModelAdapter

    name = str(name_or_path)
    if config is None:
        name, source, entry, offline = resolve_source(name_or_path)
        config = _load_config(name, source, entry, offline)
    with _quiet_load_report(), torch.device("meta"):
        model = AutoModel.from_config(config)
    return [ref.name for ref in ModelAdapter(model, name=name).resolve(layers)]


def require_trained(loaded: Any, what: str, fix: str = "use a model with a trained language-model head") -> None:
    """ConfigError when `loaded` has weights the checkpoint lacked (initialised at random when loading).

    Why: all-MiniLM-L6-v2 is a sentence encoder without a masked-LM head; loaded with ``head=True`` its
    head is random, so logits (and every patching, tracing or attribution score read from them) change
    from one load to the next. Activations before the head are unaffected (`neuron:` targets, extraction).
    """
    missing = getattr(loaded, "untrained", ())
    if missing:
        raise ConfigError(f"{loaded.name} has {len(missing)} weights its checkpoint lacks ({', '.join(missing[:2])}"
                          f"{', ...' if len(missing) > 2 else ''}), initialised at random when loading, so {what} would "
                          f"differ on every load; {fix}")


def config_hash(config) -> str:
    """sha256 of the config as sorted JSON, without the load-time keys in ``_VOLATILE_KEYS``."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def infer_kind(config) -> str:
    """decoder | encoder | encoder-decoder, from a config (for models outside the registry)."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "model_type", None) in ENCODER_TYPES:
        return "encoder"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures):
        return "encoder"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return "decoder" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "encoder"


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for CUDA but none is available: use --device cpu or auto")
    return target


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What `from_pretrained` raises for a missing, truncated or foreign checkpoint file."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError


def _is_checkpoint_problem(error: RuntimeError) -> bool:
    """torch's RuntimeErrors that mean a damaged or mismatched checkpoint, not a bug."""
    text = str(error)
    return any(key in text for key in ("size mismatch", "PytorchStreamReader", "Error(s) in loading state_dict",
                                       "unexpected EOF", "zip archive"))


def _first_sentence(error: BaseException, limit: int = 240) -> str:
    """The first sentence of an error message, whole words only: for one-line messages."""
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def resolve_source(name_or_path: str | Path) -> tuple[str, str, ModelEntry | None, str | None]:
    """(display name, source for from_pretrained, registry entry or None, why the hub is unreachable or
    None). With the hub out of reach a hub id loads from the local cache only (`local_files_only`): one
    clear error at once, instead of half a minute of retries and a dozen connection warnings."""
    name, source, entry = _resolve(str(name_or_path))
    return name, source, entry, None if Path(source).is_dir() else hub_unreachable()


def _resolve(name_or_path: str) -> tuple[str, str, ModelEntry | None]:
    """(display name, source for from_pretrained, registry entry or None)."""
    if not name_or_path.strip():
        raise UnknownModelError("the model name is empty: pass a local folder, a registry name or a hub id "
                                "(see `neuronmap models list`)")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise UnknownModelError(f"model {name_or_path!r} is a file, not a model folder: pass the folder that holds "
                                "config.json and the weights, a registry name or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"folder {name_or_path!r} has no config.json: not a transformers model folder "
                                    "(write one with model.save_pretrained(folder))")
        return name_or_path, str(path.resolve()), None
    entry = get_entry(name_or_path)
    if entry is not None:
        folder = _package_folder(entry.local_package) if entry.local_package else None
        return entry.name, str(folder) if folder else entry.hub_id, entry
    if name_or_path.startswith(("/", "./", "../", "~")) or path.exists():
        raise UnknownModelError(f"model folder {name_or_path!r} does not exist: pass an existing folder, a registry "
                                "name or a hub id. See `neuronmap models list`")
    return name_or_path, name_or_path, None


def _package_folder(package: str) -> Path | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    folder = Path(module.get_model_path())
    return folder if (folder / "config.json").is_file() else None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when it may be.

    `HF_HUB_OFFLINE` set is a reason; otherwise one TCP connection to the hub endpoint (3 s at most)
    decides. With a proxy configured the hub is assumed reachable: only the proxy knows.
    """
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                             "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"no connection to {host}:{port}: {error}"
    return None


def _load_config(name: str, source: str, entry: ModelEntry | None, offline: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=bool(offline))
    except (OSError, ValueError, KeyError) as exc:
        reason = _first_sentence(exc)
        if entry is not None:
            why = f"the hub is unreachable: {offline}" if offline else reason
            raise UnknownModelError(
                f"model {name!r} (hub id {entry.hub_id}) is neither in the local Hugging Face cache nor reachable on "
                f"the hub ({why}); download it once with network access or pass a local folder") from exc
        if Path(source).is_dir():
            model_type = _model_type(Path(source))
            if model_type and "does not recognize this architecture" in str(exc):
                import transformers

                raise UnknownModelError(
                    f"model type {model_type!r} in {source!r} is not known to transformers {transformers.__version__}: "
                    "upgrade transformers, or pass a model of a supported architecture") from exc
            raise UnknownModelError(f"cannot read the model config in {source!r}: {reason}; write config.json "
                                    "with model.save_pretrained(folder)") from exc
        close = suggest(name)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f"a cached hub id (the hub is unreachable: {offline})" if offline else "a reachable hub id"
        raise UnknownModelError(f"unknown model {name!r}: not a local folder, a registry name or {where}; "
                                f"{hint}see `neuronmap models list`") from exc


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_tokenizer(name: str, source: str, local_only: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"model {name!r} has no loadable tokenizer in {source!r}: save one next to the weights "
                          "with tokenizer.save_pretrained(folder)") from exc
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer from a folder without vocabulary files
        raise ConfigError(f"model {name!r} has no tokenizer vocabulary in {source!r} (no tokenizer.json or vocab "
                          "files): save one next to the weights with tokenizer.save_pretrained(folder)")
    ensure_padding(tokenizer)
    return tokenizer


def ensure_padding(tokenizer) -> None:
    """Give ``tokenizer`` a pad token (eos, unk, bos, then id 0) and right padding, in place.

    The pad id only fills masked positions, so reusing another special token is safe; right padding
    keeps every real token at the same position as in an unpadded forward.
    """
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report():
    """Hide transformers' load report: unexpected head weights are normal when loading a base model,
    and missing weights are re-raised by load_model as one warning.

    A filter, not a higher log level: transformers 5 runs an extra tensor-parallel check (and logs its
    own warnings) when the modeling_utils logger level is WARNING or above.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)
