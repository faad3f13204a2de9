"""The run format: manifest, HDF5/Parquet shards, writer, reader, verify, export.

A run is a folder (see DESIGN.md, "The run format")::

    <run>/manifest.json                              Manifest: status, layers, shards + sha256
    <run>/prompts.parquet                            sample_id, text, label/metadata columns
    <run>/activations/<layer dir>/part-NNNNN.h5      or .parquet, one file per (layer, shard)

Writing: `RunWriter(path, Manifest.new(...))`, `write_prompts`, `write_shard` (atomic commit),
`committed` (resume), `complete` / `fail`; `annotate_run` adds provenance to `extra` of any run. Reading: `open_run(path)`. Checking: `verify_run`.
Leaving: `export_csv`, `convert_run`. This package imports numpy, h5py, pyarrow, pandas and
pydantic only: no torch, no ray, no analysis.
"""

from .export import convert_run, export_csv
from .manifest import LayerInfo, Manifest, ShardRecord, layer_dirname, layer_from_dirname, load_manifest
from .reader import Run, open_run, virtual_dataset
from .verify import VerifyReport, verify_run
from .writer import RunWriter, annotate_run

__all__ = [
    "LayerInfo", "Manifest", "Run", "RunWriter", "ShardRecord", "VerifyReport", "annotate_run", "convert_run",
    "export_csv",
    "layer_dirname", "layer_from_dirname", "load_manifest", "open_run", "verify_run", "virtual_dataset",
]
