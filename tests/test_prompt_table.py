"""Staging a prompt source in chunks: the stored table and its hash equal what `load_prompts` gives
for the whole source at once (the independent reference), whatever the chunk size."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from neuronmap.errors import ConfigError, PromptFileError
from neuronmap.prompt_table import stage_prompts, staging_folder
from neuronmap.prompts import DEFAULT_PROMPTS, iter_prompts, load_prompts, prompt_source_hash


def _shipped(n: int = 50) -> pd.DataFrame:
    return load_prompts(DEFAULT_PROMPTS).drop(columns=["sample_id"]).iloc[:n].reset_index(drop=True)


def _sources(tmp_path):
    frame = _shipped()
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet", index=False)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict("records")))
    (tmp_path / "p.txt").write_text("\n".join(frame["text"]) + "\n")
    return {"csv": tmp_path / "p.csv", "parquet": tmp_path / "p.parquet", "jsonl": tmp_path / "p.jsonl",
            "txt": tmp_path / "p.txt", "list": frame["text"].tolist(), "frame": frame}


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl", "txt", "list", "frame"])
@pytest.mark.parametrize("chunk_rows", [7, 50, 65536])
def test_staged_table_equals_the_whole_source_loaded(tmp_path, kind, chunk_rows):
    source = _sources(tmp_path)[kind]
    whole = load_prompts(source)
    chunks = list(iter_prompts(source, chunk_rows=chunk_rows))
    assert [len(c) for c in chunks] == [min(chunk_rows, 50 - i) for i in range(0, 50, chunk_rows)]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)

    folder = tmp_path / f"stage-{kind}"
    folder.mkdir()
    reported = []  # what a progress bar is told: every chunk's rows, in order
    staged = stage_prompts(source, folder, chunk_rows=chunk_rows, on_rows=reported.append)
    assert reported == [len(c) for c in chunks]
    assert staged.n_samples == len(whole) and list(staged.columns) == list(whole.columns)
    pd.testing.assert_frame_equal(pd.read_parquet(staged.path), whole)
    assert staged.source_hash == prompt_source_hash(whole)
    assert [t for batch in staged.text_batches(rows=16) for t in batch] == whole["text"].tolist()
    assert sorted(p.name for p in folder.iterdir()) == ["prompts.parquet"]  # parts are removed


def test_columns_whose_type_or_presence_differs_between_chunks_are_unified(tmp_path):
    rows = [{"text": f"prompt {i}", "score": i} for i in range(6)]
    rows += [{"text": "late", "score": 2.5, "note": "appears late"}, {"text": "gap", "score": None}]
    path = tmp_path / "drift.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    whole = load_prompts(path)  # pandas makes `score` float64 and `note` mostly missing

    staged = stage_prompts(path, tmp_path, chunk_rows=3)
    stored = pd.read_parquet(staged.path)
    assert list(stored.columns) == ["sample_id", "text", "score", "note"]
    assert stored["score"].dtype == np.float64
    np.testing.assert_array_equal(stored["score"].to_numpy(), whole["score"].to_numpy())
    assert [None if pd.isna(v) else v for v in stored["note"]] == [None] * 6 + ["appears late", None]
    assert staged.source_hash == prompt_source_hash(whole)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_label_column_mixing_numbers_and_words_is_stored_as_text_however_chunked(tmp_path, fmt):
    """Numbers, then words (or both in one chunk): the column becomes text, `str` of each value with
    missing values kept missing, the same table and hash for every chunking, with a warning."""
    labels = [0, 1, None, 2.5, "s4", 5, "s6", None, 8]
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels, "n": range(len(labels))})
    path = tmp_path / f"mixed.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n"
                                for row in frame.to_dict("records")))
    else:
        frame.to_csv(path, index=False)
    with warnings.catch_warnings(record=True) as caught:  # CSV cells are text: a whole read may not mix
        warnings.simplefilter("always")
        whole = load_prompts(path)
    assert fmt == "csv" or any("label column 'label' mixes values of types" in str(w.message) for w in caught)
    expected = [str(v) if v is not None else None for v in labels]  # 2.5 -> "2.5", 5 -> "5" in any chunk
    assert [None if pd.isna(v) else v for v in whole["label"]] == expected
    for chunk_rows in (2, 3, 4, 100):
        (tmp_path / f"c{chunk_rows}").mkdir()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            staged = stage_prompts(path, tmp_path / f"c{chunk_rows}", chunk_rows=chunk_rows)
        if chunk_rows == 2:  # numbers-only chunks meet words-only ones: joined as text, with the warning
            assert any("label column 'label' mixes values of types" in str(w.message) for w in caught)
        stored = pd.read_parquet(staged.path)
        assert [None if pd.isna(v) else v for v in stored["label"]] == expected, chunk_rows
        assert stored["n"].tolist() == list(range(len(labels)))
        assert staged.source_hash == prompt_source_hash(whole), chunk_rows


def test_errors_in_a_later_chunk_name_the_row_as_a_whole_load_does(tmp_path):
    rows = [{"text": f"prompt {i}"} for i in range(10)] + [{"text": "   "}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(PromptFileError) as whole:
        load_prompts(path)
    with pytest.raises(PromptFileError) as chunked:
        stage_prompts(path, tmp_path, chunk_rows=4)
    assert str(chunked.value) == str(whole.value) and "line 11" in str(whole.value)

    frame = pd.DataFrame({"text": [f"p{i}" for i in range(9)] + [None]})
    with pytest.raises(PromptFileError, match="row 9 has no text"):
        list(iter_prompts(frame, chunk_rows=4))


def test_a_text_key_that_only_appears_in_a_later_chunk_asks_for_the_column(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(4)] + [{"prompt": "p", "text": "t"}]
    path = tmp_path / "late_text.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(PromptFileError, match="line 1 has no text in column 'text'"):
        load_prompts(path)  # the whole file picks `text`, which line 1 lacks
    with pytest.raises(PromptFileError, match="line 5 onwards has a key 'text'.*--text-column"):
        stage_prompts(path, tmp_path, chunk_rows=2)
    staged = stage_prompts(path, tmp_path, text_column="prompt", chunk_rows=2)
    assert staged.source_hash == prompt_source_hash(load_prompts(path, text_column="prompt"))


def test_limit_stops_across_chunks(tmp_path):
    source = _sources(tmp_path)["parquet"]
    chunks = list(iter_prompts(source, limit=12, chunk_rows=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), load_prompts(source, limit=12))


def test_staging_folder_is_beside_the_run_and_removed_even_on_error(tmp_path):
    out = tmp_path / "runs" / "r1"
    with pytest.raises(PromptFileError):
        with staging_folder(out) as folder:
            assert folder.parent == out.parent and folder.name.startswith(".r1.staging-")
            stage_prompts([], folder)
    assert list(out.parent.iterdir()) == []


def test_staged_file_reads_with_plain_pyarrow(tmp_path):
    staged = stage_prompts(_sources(tmp_path)["frame"], tmp_path, chunk_rows=8)
    table = pq.read_table(staged.path)
    assert table.column("sample_id").to_pylist() == list(range(50))
    assert pq.ParquetFile(staged.path).num_row_groups == 7


def test_read_texts_reads_any_row_range_across_row_groups(tmp_path):
    from neuronmap.prompt_table import read_texts

    frame = _sources(tmp_path)["frame"]
    staged = stage_prompts(frame, tmp_path, chunk_rows=8)  # row groups of 8 rows
    texts = frame["text"].tolist()
    for start, stop in [(0, 50), (0, 1), (7, 9), (8, 16), (13, 42), (49, 50), (5, 5)]:
        assert read_texts(staged.path, start, stop) == texts[start:stop]


def test_a_table_hashes_the_same_in_memory_and_once_stored(tmp_path):
    # nested values change shape in Arrow (every struct row gets every key): the hash follows Arrow
    frame = pd.DataFrame({"text": ["a", "b", "c"], "meta": [{"x": 1}, {"y": "z"}, None],
                          "tags": [["p", "q"], [], None], "when": pd.to_datetime(["2024-01-01", None, "2024-03-01"])})
    staged = stage_prompts(frame, tmp_path, chunk_rows=2)
    assert staged.source_hash == prompt_source_hash(load_prompts(frame))
    assert staged.source_hash == prompt_source_hash(pd.read_parquet(staged.path))
    changed = frame.assign(meta=[{"x": 1}, {"y": "other"}, None])
    assert prompt_source_hash(load_prompts(changed)) != staged.source_hash



def test_a_run_name_near_the_filesystems_limit_still_stages(tmp_path):
    out = tmp_path / ("r" * 250)  # a valid folder name; with the staging suffix it would pass 255 bytes
    with staging_folder(out) as folder:
        assert folder.parent == out.parent and len(folder.name) < 200

def test_staging_folders_left_by_killed_processes_are_removed_by_the_next_run_beside_them(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from neuronmap.prompt_table import _host

    out = tmp_path / "runs" / "r1"
    out.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    abandoned = out.parent / f".r1.staging-{_host()}-{dead.pid}-abcd"
    alive = out.parent / f".r1.staging-{_host()}-{os.getpid()}-efgh"  # a live process's: kept
    elsewhere = out.parent / f".r1.staging-otherhost-{dead.pid}-ijkl"  # another host's: kept
    # a run planned without --out (named by its start time), killed: removed by any later run here
    other_run = out.parent / f".gpt2-20261127-103600.staging-{_host()}-{dead.pid}-mnop"
    not_staging = out.parent / f".r1.notes-{_host()}-{dead.pid}-qrst"  # not a staging folder: kept
    for folder in (abandoned, alive, elsewhere, other_run, not_staging):
        folder.mkdir()
        (folder / "prompts.parquet").write_bytes(b"x")
    with staging_folder(out) as folder:
        assert folder.name.startswith(f".r1.staging-{_host()}-{os.getpid()}-")
    assert not abandoned.exists() and not other_run.exists()
    assert alive.exists() and elsewhere.exists() and not_staging.exists()


def test_csv_texts_that_look_like_numbers_or_missing_stay_verbatim_in_any_chunk(tmp_path):
    texts = [f"prompt {i}" for i in range(9)] + ["NA", "42", "line one\nline two", "null", "7.5"]
    frame = pd.DataFrame({"text": texts, "y": range(len(texts))})
    frame.to_csv(tmp_path / "tricky.csv", index=False)
    whole = load_prompts(tmp_path / "tricky.csv")
    assert whole["text"].tolist() == texts
    for chunk_rows in (2, 4, 10):
        chunks = list(iter_prompts(tmp_path / "tricky.csv", chunk_rows=chunk_rows))
        pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)


@pytest.mark.parametrize("index", [pd.RangeIndex(100, 120), pd.RangeIndex(200, 220, name="doc_id"),
                                   pd.RangeIndex(0, 40, 2, name="even"), pd.Index([5, 1] * 10, name="k")])
def test_a_parquet_index_is_kept_the_same_in_chunks_and_under_a_limit(tmp_path, index):
    # pandas saves a RangeIndex as metadata only: a batch read must rebuild a named one for its rows
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "y": range(20)}, index=index)
    frame.to_parquet(tmp_path / "p.parquet")
    whole = load_prompts(tmp_path / "p.parquet")
    assert ("doc_id" in whole.columns) == (index.name == "doc_id")
    if index.name is not None:
        assert whole[index.name].tolist() == list(index)
    for chunk_rows in (7, 64):
        pd.testing.assert_frame_equal(pd.concat(iter_prompts(tmp_path / "p.parquet", chunk_rows=chunk_rows),
                                                ignore_index=True), whole)
    pd.testing.assert_frame_equal(load_prompts(tmp_path / "p.parquet", limit=10), whole.iloc[:10])


def test_a_full_disk_while_staging_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny_model_dir):
    import errno
    import os

    import neuronmap
    from neuronmap import prompt_table
    from neuronmap.errors import StorageError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prompt_table.pq, "write_table", full)
    out = tmp_path / "runs" / "r"
    with pytest.raises(StorageError, match="disk full while writing .*prompts.parquet: free space and re-run"):
        neuronmap.extract(str(tiny_model_dir("gpt2")), ["one prompt", "another"], layers="blocks.0", out=out)
    assert list((tmp_path / "runs").iterdir()) == []  # no run folder, no staging folder


def test_a_full_disk_while_spilling_token_ids_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny_model_dir):
    import builtins

    import neuronmap
    from neuronmap import extraction
    from neuronmap.errors import StorageError

    def to_dev_full(path, mode="r", *args, **kwargs):  # the spill file lands on a device that is always full
        target = "/dev/full" if str(path).endswith("token-ids.int32") else path
        return builtins.open(target, mode, *args, **kwargs)

    monkeypatch.setattr(extraction, "open", to_dev_full, raising=False)
    out = tmp_path / "runs" / "r"
    with pytest.raises(StorageError, match="disk full while writing .*token-ids.int32"):
        neuronmap.extract(str(tiny_model_dir("gpt2")), ["one prompt", "another"] * 2000, layers="blocks.0", out=out)
    assert list((tmp_path / "runs").iterdir()) == []
