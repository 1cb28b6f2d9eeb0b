"""Training text for attention transfer: documents from local files or `datasets`, tokenized with the model's own
tokenizer, cut into chunks.

Sources (``--data``), read in the order given:

- ``.txt`` files: the whole file is one document; ``.jsonl`` files: one document per line, its ``text_field``
  (default ``"text"``). Both read line by line with the standard library; any other file that ``datasets`` does not
  read (below) is read as one ``.txt`` document, as before.
- through `datasets`' loaders, streamed (nothing is converted or cached): ``.json`` (JSON lines or an array),
  ``.parquet``, ``.csv``, ``.arrow``, and compressed ``.jsonl`` / ``.json`` / ``.csv`` / ``.txt``
  (``.gz``, ``.bz2``, ``.xz``; a compressed ``.txt`` is one document, as a plain one), with ``text_field``;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped, read row by row;
  of a ``DatasetDict``, the split ``split``, default ``"train"``), or any directory ``datasets.load_dataset`` reads;
- a Hub dataset name, ``owner/name`` or ``owner/name:config``, split ``split``, streamed: offline
  (``HF_DATASETS_OFFLINE=1``) from the local `datasets` cache, where an earlier ``load_dataset`` left it.

Empty documents (blank, or a null field) are dropped. ``max_documents`` stops reading after that many documents, so
a huge source is never materialized: only what is read is held. `datasets` is optional (the ``[eval]``
extra); only the last three kinds need it.

:class:`TokenChunks` tokenizes each document, ends it with the tokenizer's EOS token, concatenates them and cuts the
stream into rows of ``seq_len`` tokens (the remainder is dropped; with ``max_rows``, reading stops once that many rows
are full). ``batch(j, b)`` is rows ``j·b .. j·b + b − 1`` (cycling), so ``world`` processes drawing
``batch(i·world + rank, b)`` at step ``i`` see together exactly the rows one process drawing ``batch(i, world·b)``
sees: the same global batch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator

import torch

EXTRA = "the [eval] extra: pip install '.[eval]' in the fla-lola checkout"
COMPRESSIONS = (".gz", ".bz2", ".xz")
# file suffix -> `datasets` packaged loader (compressed variants included); plain .txt / .jsonl are read natively
LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


class DataError(ValueError):
    """A ``--data`` source that cannot be read: one line naming it."""


def _datasets(source: str, what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {source!r}: reading {what} needs the `datasets` package ({EXTRA})") from None
    return datasets


def _loader(path: str) -> tuple[str | None, bool]:
    """``(the datasets loader of a file name or None, whether the name has a data file's suffix)``."""
    name = path.lower()
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = os.path.splitext(name)[0]
    loader = LOADERS.get(os.path.splitext(name)[1])
    if loader is not None and not compressed and name.endswith((".txt", ".jsonl")):
        return None, True  # the plain formats this module always read itself
    return loader, loader is not None


def _texts(rows: Iterable[dict], source: str, text_field: str) -> Iterator[str]:
    for n, row in enumerate(rows):
        if text_field not in row:
            raise DataError(f"--data {source!r}: no field {text_field!r} (fields: {', '.join(map(str, row))}); "
                            "choose one with --text-field")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"--data {source!r} row {n}: field {text_field!r} is {type(text).__name__}, not text")
        yield text


def _split_of(ds, source: str, split: str):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise DataError(f"--data {source!r} has no split {split!r} (splits: {', '.join(ds)}); choose one with "
                            "--split")
        return ds[split]
    return ds


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"--data file {path!r} line {n}: expected a JSON object with a "
                                    f"{text_field!r} field ({e})") from None
                if text is not None and not isinstance(text, str):
                    raise DataError(f"--data file {path!r} line {n}: field {text_field!r} is "
                                    f"{type(text).__name__}, not text")
                if text is not None:
                    yield text


def _read_source(source: str, text_field: str, split: str) -> Iterator[str]:
    if os.path.isfile(source):
        loader, _ = _loader(source)
        if loader is None:
            if source.endswith(".jsonl"):
                yield from _read_jsonl(source, text_field)
            else:
                with open(source, encoding="utf-8") as f:
                    yield f.read()
            return
        datasets = _datasets(source, f"a {loader} file")
        kwargs = {"sample_by": "document"} if loader == "text" else {}
        try:
            ds = datasets.load_dataset(loader, data_files=[os.path.abspath(source)], split="train", streaming=True,
                                       **kwargs)
            yield from _texts(ds, source, "text" if loader == "text" else text_field)
        except DataError:
            raise
        except Exception as e:  # a malformed file: datasets' own error, on one line
            raise DataError(f"--data file {source!r}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    elif os.path.isdir(source):
        datasets = _datasets(source, "a dataset directory")
        if any(os.path.isfile(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            ds = _split_of(datasets.load_from_disk(source), source, split)  # memory-mapped Arrow
            if text_field not in ds.column_names:
                raise DataError(f"--data {source!r}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                                "choose one with --text-field")
            for batch in ds.select_columns([text_field]).iter(batch_size=256):
                yield from _texts(({text_field: t} for t in batch[text_field]), source, text_field)
        else:
            try:
                ds = datasets.load_dataset(os.path.abspath(source), split=split, streaming=True)
            except Exception as e:
                raise DataError(f"--data directory {source!r} is neither a dataset saved with save_to_disk nor "
                                f"data files datasets can load ({type(e).__name__}: {e})".replace("\n", " ")) from None
            yield from _texts(ds, source, text_field)
    else:
        _, file_name = _loader(source)
        if os.path.isabs(source) or file_name or not HUB_NAME.match(source):
            raise DataError(f"--data file {source!r} does not exist")
        try:
            import datasets
        except ImportError:
            raise DataError(f"--data {source!r} does not exist (as a Hub dataset name, reading it needs the "
                            f"`datasets` package: {EXTRA})") from None
        name, _, config = source.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
            yield from _texts(ds, source, text_field)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"--data {source!r} does not exist as a file or directory, nor as a dataset datasets "
                            f"could load (a Hub name offline, HF_DATASETS_OFFLINE=1, is read from the local cache): "
                            f"{type(e).__name__}: {e}".replace("\n", " ")) from None


def iter_documents(paths, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of the ``--data`` sources ``paths``, lazily and in order (see the module's docstring)."""
    for path in paths:
        for doc in _read_source(os.fspath(path), text_field, split):
            if doc.strip():
                yield doc


def read_documents(paths, *, text_field: str = "text", split: str = "train",
                   max_documents: int | None = None) -> list[str]:
    """The documents of the ``--data`` sources ``paths`` (``ValueError`` naming a missing or unreadable one), at most
    ``max_documents`` of them."""
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise DataError(f"--max-documents must be a positive integer, got {max_documents!r}")
    return list(itertools.islice(iter_documents(paths, text_field=text_field, split=split), max_documents))


class TokenChunks:
    """``[N, seq_len]`` token rows from documents (any iterable), tokenized with ``tokenizer``; with ``max_rows``,
    the first ``max_rows`` rows, reading no further documents than they need."""

    def __init__(self, documents: Iterable[str], tokenizer, seq_len: int, max_rows: int | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for doc in documents:
            stream.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
            if eos is not None:
                stream.append(eos)
            if max_rows is not None and len(stream) >= max_rows * seq_len:
                break
        n = len(stream) // seq_len if max_rows is None else min(len(stream) // seq_len, max_rows)
        if n == 0:
            raise ValueError(f"the --data files hold {len(stream)} tokens, fewer than one sequence of --seq-len "
                             f"{seq_len}")
        self.rows = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def batch(self, j: int, batch_size: int) -> torch.Tensor:
        """Rows ``j·b .. j·b + b − 1`` modulo the number of rows."""
        idx = (torch.arange(batch_size) + j * batch_size) % len(self)
        return self.rows[idx]
