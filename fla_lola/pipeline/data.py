"""Training text for attention transfer: local files tokenized with the model's own tokenizer, cut into chunks.

:class:`TokenChunks` reads ``.txt`` files (the whole file is one document) and ``.jsonl`` files (one document per
line, its ``"text"`` field), tokenizes each document, ends it with the tokenizer's EOS token, concatenates them
and cuts the stream into rows of ``seq_len`` tokens (the remainder is dropped). ``batch(j, b)`` is rows
``j·b .. j·b + b − 1`` (cycling), so ``world`` processes drawing ``batch(i·world + rank, b)`` at step ``i`` see
together exactly the rows one process drawing ``batch(i, world·b)`` sees: the same global batch.
"""

from __future__ import annotations

import json
import os

import torch


def read_documents(paths) -> list[str]:
    """The documents of ``.txt`` / ``.jsonl`` files (``ValueError`` naming a missing or unreadable file)."""
    docs = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"--data file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            docs.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"--data file {path!r} line {n}: expected a JSON object with a "
                                             f"'text' field ({e})") from None
            else:
                docs.append(f.read())
    return [d for d in docs if d.strip()]


class TokenChunks:
    """``[N, seq_len]`` token rows from documents, tokenized with ``tokenizer``."""

    def __init__(self, documents: list[str], tokenizer, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for doc in documents:
            stream.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
            if eos is not None:
                stream.append(eos)
        n = len(stream) // seq_len
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
