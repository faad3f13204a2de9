"""Prompt loading: every source type, every user error, and the shipped prompt set."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronmap.errors import ConfigError, PromptFileError
from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts, prompt_source_hash

LABELS = ["topic", "question_type", "sentiment", "answer_type", "length_bucket", "is_question"]


def _check_ids(df: pd.DataFrame) -> None:
    assert list(df.columns[:2]) == ["sample_id", "text"]
    assert df["sample_id"].dtype == "int64"
    assert df["sample_id"].tolist() == list(range(len(df)))
    assert df.index.equals(pd.RangeIndex(len(df)))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- sources


def test_txt_skips_blank_lines_and_strips_newlines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"\xef\xbb\xbfFirst prompt\r\n\n   \n  indented, kept  \nlast without newline")
    df = load_prompts(p)
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text"]
    assert df["text"].tolist() == ["First prompt", "  indented, kept  ", "last without newline"]


def test_txt_limit_and_str_path(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"prompt {i}" for i in range(100)) + "\n", encoding="utf-8")
    df = load_prompts(str(p), limit=7)
    _check_ids(df)
    assert df["text"].tolist() == [f"prompt {i}" for i in range(7)]


def test_a_text_column_for_a_txt_file_is_refused(tmp_path):
    """A .txt file has no columns: a --text-column given with it is a mistake, not something to ignore."""
    p = tmp_path / "p.txt"
    p.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="does not apply to .*p.txt.*leave out --text-column"):
        load_prompts(p, text_column="question")


def test_jsonl_autodetects_text_column_and_keeps_labels(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [
        {"id": 10, "prompt": "Hello there.", "label": "a"},
        {"id": 11, "prompt": "Goodbye.\n", "label": "b", "extra": 1.5},
        {"prompt": "Third", "id": 12},
    ])
    (tmp_path / "p.jsonl").write_text(p.read_text() + "\n", encoding="utf-8")  # trailing blank line
    df = load_prompts(p)
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text", "id", "label", "extra"]
    assert df["text"].tolist() == ["Hello there.", "Goodbye.", "Third"]
    assert df["id"].tolist() == [10, 11, 12]
    assert df["label"].tolist()[:2] == ["a", "b"] and pd.isna(df["label"][2])
    assert pd.isna(df["extra"][0]) and df["extra"][1] == 1.5


def test_jsonl_explicit_column_keeps_other_text_column(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"text": "context one", "question": "Why?", "sample_id": 5}])
    df = load_prompts(p, text_column="question")
    assert list(df.columns) == ["sample_id", "text", "source_text", "source_sample_id"]
    assert df.loc[0, "text"] == "Why?" and df.loc[0, "source_text"] == "context one"
    assert df.loc[0, "sample_id"] == 0 and df.loc[0, "source_sample_id"] == 5


def test_jsonl_limit_stops_before_bad_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\nnot json at all\n', encoding="utf-8")
    assert load_prompts(p, limit=2)["text"].tolist() == ["a", "b"]


def test_csv_keeps_label_columns_in_order(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text(
        'label,Question,score\npos,"Is it good, really?",1\nneg,NA,2\nneu,"multi\nline",3\n',
        encoding="utf-8",
    )
    df = load_prompts(p)  # case-insensitive auto-detection of "question"
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text", "label", "score"]
    assert df["text"].tolist() == ["Is it good, really?", "NA", "multi\nline"]  # "NA" is a prompt, not missing
    assert df["label"].tolist() == ["pos", "neg", "neu"]
    assert df["score"].tolist() == [1, 2, 3]
    assert len(load_prompts(p, limit=2)) == 2
    p.write_text("text,y\n42,1\n3.50,2\n", encoding="utf-8")  # CSV cells are untyped: "42" is a prompt
    assert load_prompts(p)["text"].tolist() == ["42", "3.50"]


def test_parquet_roundtrip(tmp_path):
    src = pd.DataFrame({"sentence": ["one", "two", "three"], "y": [0, 1, 0], "flag": [True, False, True]})
    p = tmp_path / "p.parquet"
    src.to_parquet(p)
    df = load_prompts(p)
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text", "y", "flag"]
    assert df["text"].tolist() == ["one", "two", "three"]
    assert df["y"].tolist() == [0, 1, 0] and df["flag"].tolist() == [True, False, True]
    assert load_prompts(p, limit=2)["text"].tolist() == ["one", "two"]
    # a loaded table written back to Parquet loads identically
    p2 = tmp_path / "again.parquet"
    df.to_parquet(p2)
    again = load_prompts(p2)
    assert list(again.columns) == ["sample_id", "text", "y", "flag"]
    assert prompt_source_hash(again) == prompt_source_hash(df)
    # ids that are not 0..n-1 belong to the source and are kept beside ours
    df.assign(sample_id=[7, 8, 9]).to_parquet(p2)
    assert load_prompts(p2)["source_sample_id"].tolist() == [7, 8, 9]


def test_list_and_dataframe_sources():
    df = load_prompts(["a prompt", "another\n"])
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text"] and df["text"].tolist() == ["a prompt", "another"]
    assert load_prompts(("x", "y", "z"), limit=2)["text"].tolist() == ["x", "y"]

    src = pd.DataFrame({"k": [3, 4], "input": ["p", "q"]}, index=[7, 9])
    df = load_prompts(src)
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text", "k"]
    assert df["text"].tolist() == ["p", "q"] and df["k"].tolist() == [3, 4]
    assert list(src.columns) == ["k", "input"]  # caller's frame untouched


def test_source_hash_is_stable_and_sensitive():
    a = pd.DataFrame({"text": ["x", "y"], "lab": ["p", "n"]})
    base = prompt_source_hash(load_prompts(a))
    assert len(base) == 64 and base == prompt_source_hash(load_prompts(a.copy()))
    assert base == prompt_source_hash(load_prompts(a[["lab", "text"]]))  # column order irrelevant
    assert base != prompt_source_hash(load_prompts(pd.DataFrame({"text": ["x", "y"], "lab": ["p", "p"]})))
    assert base != prompt_source_hash(load_prompts(pd.DataFrame({"text": ["y", "x"], "lab": ["n", "p"]})))
    assert base != prompt_source_hash(load_prompts(["x", "y"]))
    # the same table from CSV and Parquet hashes the same
    assert prompt_source_hash(load_prompts(["x", "y"])) == prompt_source_hash(pd.DataFrame({"text": ["x", "y"]}))


def test_source_hash_same_across_formats(tmp_path):
    df = load_prompts(DEFAULT_PROMPTS, limit=50)
    df.drop(columns="sample_id").to_parquet(tmp_path / "q.parquet", index=False)
    _write_jsonl(tmp_path / "q.jsonl", df.drop(columns="sample_id").to_dict(orient="records"))
    h = prompt_source_hash(df)
    assert prompt_source_hash(load_prompts(tmp_path / "q.parquet")) == h
    assert prompt_source_hash(load_prompts(tmp_path / "q.jsonl")) == h


# ----------------------------------------------------------------------------------- errors


def _err(source, **kw) -> str:
    with pytest.raises(PromptFileError) as ei:
        load_prompts(source, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    msg = _err(tmp_path / "nope.txt")
    assert "nope.txt" in msg and "not found" in msg


def test_directory(tmp_path):
    assert "directory" in _err(tmp_path)


def test_unknown_extension_lists_supported(tmp_path):
    p = tmp_path / "p.json"
    p.write_text("[]", encoding="utf-8")
    msg = _err(p)
    assert "p.json" in msg and "'.json'" in msg
    for ext in (".txt", ".jsonl", ".csv", ".parquet"):
        assert ext in msg


@pytest.mark.parametrize("name,content", [
    ("e.txt", b""), ("b.txt", b"\n  \n\t\n"), ("e.jsonl", b""), ("b.jsonl", b"\n\n"),
    ("e.csv", b""), ("h.csv", b"text,label\n"),
])
def test_empty_files(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    msg = _err(p)
    assert name in msg and ("empty" in msg or "no rows" in msg)


def test_empty_parquet_list_and_frame(tmp_path):
    p = tmp_path / "e.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(p)
    assert "empty" in _err(p)
    assert "empty" in _err([])
    assert "no rows" in _err(pd.DataFrame({"text": []}))


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl", "bad.csv"])
def test_not_utf8_names_offset_and_iconv(tmp_path, name):
    p = tmp_path / name
    head = b'text\n' if name.endswith(".csv") else b''
    line = b'{"text": "caf\xe9"}\n' if name.endswith(".jsonl") else b"caf\xe9\n"
    first = '{"text": "ok é"}\n' if name.endswith(".jsonl") else "ok é line\n"
    data = head + first.encode() + line
    p.write_bytes(data)
    offset = data.index(b"caf\xe9") + 3
    msg = _err(p)
    assert name in msg and "UTF-8" in msg and f"offset {offset}" in msg and "iconv -f latin1 -t utf-8" in msg


def test_not_utf8_beyond_first_chunk(tmp_path):
    from neuronmap.prompts import _first_bad_utf8_offset

    p = tmp_path / "big.csv"
    data = b"text\n" + "é\n".encode() * 1000 + b"\xff\n"
    p.write_bytes(data)
    assert _first_bad_utf8_offset(p, chunk_size=7) == len(data) - 2
    assert f"offset {len(data) - 2}" in _err(p)


def test_malformed_json_line_number(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    msg = _err(p)
    assert "p.jsonl" in msg and "line 3" in msg and "JSON" in msg


def test_json_line_not_an_object(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    msg = _err(p)
    assert "line 2" in msg and "object" in msg


def test_malformed_csv(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("text,label\na,b\nc,d,e,f\n", encoding="utf-8")
    msg = _err(p)
    assert "p.csv" in msg and "CSV" in msg



@pytest.mark.parametrize("extra", ["1,3,4", "1,3"])
def test_csv_whose_first_row_outgrows_the_header_is_refused(tmp_path, extra):
    """pandas would silently turn the extra leading fields into an index and store the wrong text."""
    p = tmp_path / "p.csv"
    p.write_text(f"text,label\na,{extra}\nb,2\n", encoding="utf-8")
    msg = _err(p)
    assert "p.csv" in msg and "more fields than the header" in msg and "quote" in msg

def test_corrupt_parquet(tmp_path):
    p = tmp_path / "p.parquet"
    p.write_bytes(b"this is not parquet")
    msg = _err(p)
    assert "p.parquet" in msg and "Parquet" in msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "frame"])
def test_missing_text_column_lists_columns(tmp_path, fmt):
    src = pd.DataFrame({"body": ["x"], "label": ["y"]})
    if fmt == "csv":
        source = tmp_path / "p.csv"
        src.to_csv(source, index=False)
    elif fmt == "jsonl":
        source = _write_jsonl(tmp_path / "p.jsonl", src.to_dict(orient="records"))
    elif fmt == "parquet":
        source = tmp_path / "p.parquet"
        src.to_parquet(source)
    else:
        source = src
    msg = _err(source)
    assert "'body'" in msg and "'label'" in msg and "--text-column" in msg
    msg = _err(source, text_column="Body")
    assert "'Body'" in msg and "'body'" in msg and "--text-column" in msg
    assert load_prompts(source, text_column="body")["text"].tolist() == ["x"]


def test_non_string_and_empty_text_values_name_the_row(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": 42}])
    msg = _err(p)
    assert "line 2" in msg and "int" in msg and "'text'" in msg

    p = _write_jsonl(tmp_path / "q.jsonl", [{"text": "ok"}, {"text": "fine"}, {"label": "no text"}])
    msg = _err(p)
    assert "line 3" in msg and "no text" in msg

    p = _write_jsonl(tmp_path / "r.jsonl", [{"text": "ok"}, {"text": "   "}])
    assert "line 2" in _err(p) and "empty" in _err(p)

    p = tmp_path / "p.csv"
    p.write_text('text,label\nfine,a\n"",b\n', encoding="utf-8")
    msg = _err(p)
    assert "row 1" in msg and "p.csv" in msg

    msg = _err(pd.DataFrame({"text": ["a", None]}))
    assert "row 1" in msg and "no text" in msg
    msg = _err(["a", 3])
    assert "index 1" in msg and "int" in msg
    assert "index 0" in _err(["\n", "b"])


def test_bad_source_type_and_limit():
    assert "list of strings" in _err(42)
    with pytest.raises(ConfigError):
        load_prompts(["a"], limit=0)


# --------------------------------------------------------------------------- shipped prompt set


def test_shipped_prompts():
    assert DEFAULT_PROMPTS.is_file()
    df = load_prompts(DEFAULT_PROMPTS)
    _check_ids(df)
    assert list(df.columns) == ["sample_id", "text", *LABELS]
    assert len(df) >= 300
    assert not df["text"].duplicated().any()
    assert not df["text"].str.lower().str.strip().duplicated().any()
    for col in LABELS:
        assert df[col].notna().all(), col
        assert df[col].value_counts().min() >= 20, (col, df[col].value_counts().to_dict())
    words = df["text"].str.split().str.len()
    assert words.std() > 3 and words.min() >= 3 and words.max() >= 30
    assert df["is_question"].dtype == bool
    assert (df["is_question"] == df["text"].str.endswith("?")).all()
    assert ((df["question_type"] == "statement") == ~df["is_question"]).all()
    assert ((df["answer_type"] == "none") == (df["question_type"] == "statement")).all()
    expected_bucket = pd.cut(words, [0, 7, 15, 10**6], labels=["short", "medium", "long"]).astype(str)
    assert (df["length_bucket"] == expected_bucket).all()
    assert {"positive", "negative", "neutral"} == set(df["sentiment"])


def test_loaded_frame_loads_again_unchanged():
    from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts

    first = load_prompts(DEFAULT_PROMPTS).head(20)
    again = load_prompts(first)
    assert "source_sample_id" not in again.columns
    assert again.equals(first)


def test_builtin_questions_names_the_shipped_prompt_set_from_any_folder(tmp_path, monkeypatch):
    """`-p builtin:questions` worked in a YAML experiment but `extract` said `prompt file builtin:questions not found`."""
    from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts

    monkeypatch.chdir(tmp_path)
    pd.testing.assert_frame_equal(load_prompts("builtin:questions"), load_prompts(DEFAULT_PROMPTS))
