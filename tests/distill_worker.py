"""Run by tests/test_distill_ddp.py under `accelerate launch`: one `fla-lola distill` run, then every process saves
the feature maps and mixing logits it ended with (``RANK.pt`` in the directory given last)."""

import os
import sys

import torch

from fla_lola.pipeline.checkpoint import distill_checkpoint
from fla_lola.pipeline.lolcats import lolcats_state_dict


def run(src, out, data, dump):
    student = distill_checkpoint(src, out, [data], window_size=8, cache_size=8, feature_dim=16, steps=3,
                                 batch_size=4, seq_len=32, save_every=100, dtype="float64", progress=False)
    torch.save(lolcats_state_dict(student), os.path.join(dump, f"{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    run(*sys.argv[1:5])
