"""`distill --data` from `datasets`: a `save_to_disk` directory (Dataset and DatasetDict), parquet / JSON / JSONL / CSV /
compressed text through `datasets`' loaders, and a Hub dataset name read offline from the local cache; each gives
back exactly the documents written, in order, reading no further than `--max-documents`."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import sys

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="the [eval] extra (datasets) is not installed")

from test_cli import hub_model  # noqa: E402,F401  (the tiny teacher fixture)
from tiny_hub import run_cli  # noqa: E402

from fla_lola.pipeline import data  # noqa: E402
from fla_lola.pipeline.data import DataError, TokenChunks, iter_documents, read_documents  # noqa: E402

DOCS = [f"Document {i}: the grass is green, the sky is blue, and the magic number is {1000 + 7 * i}.\nSecond line."
        for i in range(12)]


def rows(field="text", docs=DOCS):
    return {field: list(docs), "id": list(range(len(docs)))}


def test_save_to_disk_directories(tmp_path):
    datasets.Dataset.from_dict(rows("content")).save_to_disk(tmp_path / "ds")
    assert read_documents([tmp_path / "ds"], text_field="content") == DOCS
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(docs=DOCS[:7])),
                                   "validation": datasets.Dataset.from_dict(rows(docs=DOCS[7:]))})
    splits.save_to_disk(tmp_path / "dd")
    assert read_documents([tmp_path / "dd"]) == DOCS[:7]  # the train split by default
    assert read_documents([tmp_path / "dd"], split="validation") == DOCS[7:]
    with pytest.raises(DataError, match="no split 'test' .*train, validation.*--split"):
        read_documents([tmp_path / "dd"], split="test")
    with pytest.raises(DataError, match="no field 'text' .*content.*--text-field"):
        read_documents([tmp_path / "ds"])


def test_files_through_datasets_loaders_and_the_native_formats(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    table = datasets.Dataset.from_dict(rows("body"))
    table.to_parquet(tmp_path / "a.parquet")
    table.to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "a.json").write_text(json.dumps([{"body": d, "id": i} for i, d in enumerate(DOCS)]))  # an array
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in DOCS)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    for name in ("a.parquet", "a.csv", "a.json", "a.jsonl.gz", "a.jsonl"):
        assert read_documents([tmp_path / name], text_field="body") == DOCS, name
    # text: a file is one document, compressed (datasets' text loader, sample_by="document") or not (read natively)
    with bz2.open(tmp_path / "b.txt.bz2", "wt") as f:
        f.write(DOCS[0])
    (tmp_path / "c.txt").write_text(DOCS[1])
    assert read_documents([tmp_path / "b.txt.bz2", tmp_path / "c.txt"]) == DOCS[:2]
    # several sources in the order given; blank documents dropped, as before
    (tmp_path / "blank.txt").write_text("  \n")
    assert read_documents([tmp_path / "c.txt", tmp_path / "blank.txt", tmp_path / "a.parquet"],
                          text_field="body") == [DOCS[1], *DOCS]
    with pytest.raises(DataError, match="no field 'text'"):
        read_documents([tmp_path / "a.parquet"])
    # streamed: nothing was converted to Arrow in the datasets cache (a huge file is read, not copied)
    assert not [f for _, _, files in os.walk(tmp_path / "cache") for f in files if f.endswith(".arrow")]


def test_max_documents_reads_no_further(tmp_path):
    """Sources are read lazily: a bad row after the budget is never reached (reading everything would fail)."""
    bad = [{"text": d} for d in DOCS[:3]] + [{"text": 12345}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    datasets.Dataset.from_dict({"text": [json.dumps(r) for r in bad]}).save_to_disk(tmp_path / "ds")
    assert read_documents([tmp_path / "bad.jsonl"], max_documents=3) == DOCS[:3]
    with pytest.raises(DataError, match="line 4: field 'text' is int, not text"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad[:3]))
    assert read_documents([tmp_path / "good.jsonl", tmp_path / "ds"], max_documents=5) == \
        [*DOCS[:3], json.dumps(bad[0]), json.dumps(bad[1])]  # the budget spans sources

    class Tokenizer:  # one token per character: rows of 8 tokens
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    def documents():
        yield from DOCS[:2]
        raise AssertionError("read past the rows asked for")

    full = TokenChunks(DOCS, Tokenizer(), 8)
    some = TokenChunks(documents(), Tokenizer(), 8, max_rows=3)
    assert len(some) == 3 and torch.equal(some.rows, full.rows[:3])


def cache_like_the_hub(cache_dir, repo_id, table_file):
    """What `load_dataset(repo_id)` leaves in the `datasets` cache when it ran online: the prepared Arrow files
    under `<cache>/<owner>___<name>/default/0.0.0/<commit>/`, as datasets' Parquet builder writes them."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(cache_dir), dataset_name=name, config_id="default", hash="0" * 40,
                      data_files=DataFilesDict.from_patterns({"train": [str(table_file)]}))
    builder.download_and_prepare()
    os.rename(cache_dir / name, cache_dir / f"{owner}___{name}")


def test_hub_dataset_name_from_the_local_cache_offline(tmp_path, monkeypatch):
    datasets.Dataset.from_dict(rows()).to_parquet(tmp_path / "t.parquet")
    cache = tmp_path / "cache"
    cache_like_the_hub(cache, "someone/tiny-corpus", tmp_path / "t.parquet")
    # what HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE=<cache> set when datasets is imported
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert read_documents(["someone/tiny-corpus"], max_documents=10) == DOCS[:10]
    assert read_documents(["someone/tiny-corpus:default"]) == DOCS  # owner/name:config
    with pytest.raises(DataError) as e:
        read_documents(["someone/not-cached"])
    assert "'someone/not-cached' does not exist" in str(e.value) and "HF_DATASETS_OFFLINE" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_datasets_is_a_clear_error(tmp_path, monkeypatch):
    datasets.Dataset.from_dict(rows()).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text(DOCS[0])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, as where it is not installed
    assert read_documents([tmp_path / "a.txt"]) == DOCS[:1]  # the native formats need nothing
    for source, what in ((tmp_path / "a.parquet", "a parquet file"), (tmp_path, "a dataset directory"),
                         ("someone/tiny-corpus", "as a Hub dataset name")):
        with pytest.raises(DataError) as e:
            read_documents([source])
        assert str(e.value).startswith(f"--data {str(source)!r}") and what in str(e.value)
        assert "`datasets`" in str(e.value) and "pip install '.[eval]'" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_documents([tmp_path / "none.parquet"])


def test_distill_reads_a_saved_dataset_with_text_field(hub_model, tmp_path, monkeypatch, capsys):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows("content")),
                          "validation": datasets.Dataset.from_dict(rows("content", DOCS[:1]))}
                         ).save_to_disk(tmp_path / "corpus")
    seen = []

    def recording(paths, **kw):
        seen.append(read(paths, **kw))
        return seen[-1]

    read = data.read_documents
    monkeypatch.setattr(data, "read_documents", recording)
    common = ["--window-size", 8, "--cache-size", 8, "--feature-dim", 16, "--steps", 1, "--batch-size", 2,
              "--seq-len", 32]
    assert run_cli("distill", hub_model, tmp_path / "student", "--data", tmp_path / "corpus", "--text-field",
                   "content", "--max-documents", 9, *common) == 0
    assert seen == [DOCS[:9]] and (tmp_path / "student" / "config.json").is_file()
    capsys.readouterr()
    assert run_cli("distill", hub_model, tmp_path / "s2", "--data", tmp_path / "corpus", *common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fla-lola: error: --data") and "--text-field" in err and "\n" not in err
    assert not (tmp_path / "s2").exists()
