"""Response encodings of /v1/extract, chosen by the `Accept` header.

- ``application/json`` (default, also for ``*/*`` or no header): `ExtractResponse`, arrays as nested lists,
  written by orjson straight from the arrays: each number is the shortest text that reads back to the
  same float32/float16 value (a float32 costs about 10 characters instead of the 18 of a float64
  repr), non-finite values are ``null``, and encoding is about 7x (one text) to 23x (thousands of
  rows) faster than `json.dumps` of `ndarray.tolist()` (benchmarks/BENCHMARKS.md, "Serve").
- ``application/vnd.apache.arrow.stream``: one Arrow IPC stream holding a table with ``text_index``
  (int32), ``token_index`` (int32, pooling none only) and one ``fixed_size_list<float>`` column per
  layer (each row's values flattened in C order, the same layout as a Parquet shard's ``activation``
  column); the schema metadata ``neuronmap.shapes`` maps each layer to its row shape.
- ``application/x-npy``: one layer's array as a ``.npy`` file (a request that resolves to more layers
  is refused with 406: ask for one layer, or for Arrow / ``.npz``).
- ``application/x-npz``: every layer in one ``.npz`` (keys are the layer names).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import orjson

from .schemas import ApiError, ExtractOutcome

JSON = "application/json"
ARROW = "application/vnd.apache.arrow.stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"
FORMATS = (JSON, ARROW, NPY, NPZ)


def negotiate(accept: str | None) -> str:
    """The best of FORMATS for an Accept header (q-values honoured); ApiError 406 when none fits."""
    if not accept or not accept.strip():
        return JSON
    offers: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if quality <= 0 or not media:
            continue
        if media in ("*/*", "application/*"):
            offers.append((quality, position, JSON))
        elif media in FORMATS:
            offers.append((quality, position, media))
    if not offers:
        raise ApiError(406, "not_acceptable", f"cannot answer Accept: {accept[:200]!r}; ask for one of "
                       f"{', '.join(FORMATS)}")
    offers.sort(key=lambda offer: (-offer[0], offer[1]))
    return offers[0][2]


def row_index(outcome: ExtractOutcome, pooling: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(text_index, token_index) of every row: one row per text, or per token with pooling none."""
    lengths = np.asarray(outcome.lengths, dtype=np.int64)
    if pooling != "none":
        return np.arange(len(lengths), dtype=np.int32), None
    text = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    token = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if len(lengths) else np.zeros(0, np.int32)
    return text, token


def encode_json(model: str, pooling: str, dtype: str, outcome: ExtractOutcome) -> bytes:
    text, token = row_index(outcome, pooling)
    body: dict[str, Any] = {
        "model": model, "pooling": pooling, "dtype": dtype, "n_texts": int(len(outcome.lengths)),
        "n_tokens": np.asarray(outcome.lengths, dtype=np.int64), "n_truncated": int(outcome.n_truncated),
        "text_index": text if token is not None else None,
        "token_index": token,
        "layers": {name: {"shape": list(array.shape), "dtype": str(array.dtype), "data": np.ascontiguousarray(array)}
                   for name, array in outcome.arrays.items()},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_arrow(model: str, pooling: str, dtype: str, outcome: ExtractOutcome) -> bytes:
    import pyarrow as pa

    text, token = row_index(outcome, pooling)
    columns = {"text_index": pa.array(text, pa.int32())}
    if token is not None:
        columns["token_index"] = pa.array(token, pa.int32())
    for name, array in outcome.arrays.items():
        width = int(np.prod(array.shape[1:]))
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, width)
    metadata = {"neuronmap.model": model, "neuronmap.pooling": pooling, "neuronmap.dtype": dtype,
                "neuronmap.shapes": json.dumps({name: list(a.shape[1:]) for name, a in outcome.arrays.items()})}
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_arrow(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{layer: ndarray (rows, *shape)} and the table's other columns/metadata, from an Arrow response."""
    import pyarrow as pa

    table = pa.ipc.open_stream(payload).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    shapes = json.loads(meta["neuronmap.shapes"])
    arrays = {}
    for name, shape in shapes.items():
        values = table[name].combine_chunks().flatten().to_numpy()
        arrays[name] = values.reshape(table.num_rows, *shape)
    extra = {name: table[name].to_numpy() for name in ("text_index", "token_index") if name in table.column_names}
    return arrays, {**meta, **extra}


def encode_npy(outcome: ExtractOutcome) -> tuple[bytes, str]:
    if len(outcome.arrays) != 1:
        raise ApiError(406, "not_acceptable", f"application/x-npy holds one array but the layer spec selects "
                       f"{len(outcome.arrays)} layers; ask for one layer, or Accept: {NPZ} or {ARROW}")
    (name, array), = outcome.arrays.items()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue(), name


def encode_npz(outcome: ExtractOutcome) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **outcome.arrays)
    return buffer.getvalue()


def encode(media: str, model: str, pooling: str, dtype: str, outcome: ExtractOutcome) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the response in `media` (from `negotiate`)."""
    headers = {"Content-Type": media}
    if media == ARROW:
        return encode_arrow(model, pooling, dtype, outcome), headers
    if media == NPY:
        body, layer = encode_npy(outcome)
        return body, {**headers, "X-NeuronMap-Layer": layer}
    if media == NPZ:
        return encode_npz(outcome), headers
    return encode_json(model, pooling, dtype, outcome), headers
