"""`fla-lola distill` under `accelerate launch` (data parallel, 2 CPU processes, gloo): both ranks end with the same
feature maps and mixing logits, equal to a single-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.test_cli import CORPUS, hub_model  # noqa: F401  (the fixture)

pytest.importorskip("accelerate")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_worker.py")


def launch(args, processes, env):
    # `accelerate launch` of `processes` workers; ACCELERATE_USE_CPU=true makes them one DDP group on gloo
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = accelerate + [WORKER, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(hub_model, tmp_path):  # noqa: F811
    (tmp_path / "a.txt").write_text(CORPUS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    from tests.distill_worker import run

    for name in ("one", "two"):
        (tmp_path / f"dump-{name}").mkdir()
    run(hub_model, tmp_path / "one", tmp_path / "a.txt", tmp_path / "dump-one")  # one process, in this one
    launch([hub_model, tmp_path / "two", tmp_path / "a.txt", tmp_path / "dump-two"], 2, env)
    one = torch.load(tmp_path / "dump-one" / "0.pt")
    rank0, rank1 = (torch.load(tmp_path / "dump-two" / f"{r}.pt") for r in (0, 1))
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)  # data parallel keeps the replicas identical
    # same global batch, same training: the gap is float64 rounding (gradients summed in another order);
    # training moved the tensors by more than 1e-2
    from transformers import AutoModelForCausalLM

    from fla_lola.pipeline.convert import convert_to_lola
    from fla_lola.pipeline.lolcats import lolcats_state_dict

    init = lolcats_state_dict(convert_to_lola(AutoModelForCausalLM.from_pretrained(hub_model), window_size=8,
                                              cache_size=8, feature_dim=16))
    assert one.keys() == rank0.keys() == init.keys()
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    gap = max((rank0[k] - one[k]).abs().max().item() for k in one)
    assert moved > 1e-2 and gap < 1e-6 * moved, (gap, moved)
    assert (tmp_path / "two").is_dir() and (tmp_path / "one").is_dir()  # rank 0 wrote OUT
