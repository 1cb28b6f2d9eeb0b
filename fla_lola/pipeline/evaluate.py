"""Evaluate a model directory with EleutherAI's lm-evaluation-harness (``lm_eval``), the way ``lm_eval --model hf``
does, with ``fla_lola`` registered so that ``model_type: lola`` loads.

:func:`evaluate` is lm-eval's own pipeline: its Hugging Face model class (``lm_eval.models.huggingface.HFLM``) on the
directory, told that the model is causal (``backend="causal"``: lm-eval's guess reads transformers' static name tables,
which do not list ``lola``, and would log "neither CausalLM nor Seq2SeqLM"), its task index
(``lm_eval.tasks.TaskManager``, with ``include_path`` for local task YAMLs and ``metadata`` for tasks that take
arguments, e.g. RULER's ``max_seq_lengths``), ``lm_eval.simple_evaluate``, and its ``EvaluationTracker`` writing
``OUTPUT/<model>/results_<date>.json`` (and ``samples_<task>_<date>.jsonl`` with ``log_samples``), exactly the files
``lm_eval`` writes. ``fla-lola eval`` is this function on the command line.

As ``lm_eval``'s command line does, the model's arguments go into the task metadata, so RULER's synthetic tasks size
their documents with the model's own tokenizer unless ``metadata`` names another (``{"tokenizer": ...}``).

lm-eval is optional (``pip install '.[eval]'``); the library core never imports this module.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

EXTRA = "the [eval] extra: pip install '.[eval]' in the fla-lola checkout"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise ValueError(f"evaluation needs lm-evaluation-harness ({e.name or e} is missing): {EXTRA}") from None


def _check_model_dir(model) -> str:
    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ValueError(f"MODEL {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"MODEL {path!r} has no config.json (not a transformers model directory)")
    return path


def resolve_tasks(tasks, task_manager) -> list:
    """lm-eval task names, globs, task YAML files or a directory of them (as ``lm_eval --tasks`` takes them), resolved
    against ``task_manager``; ``ValueError`` naming every task it does not know."""
    from lm_eval.tasks._yaml_loader import load_yaml

    names = [t.strip() for task in ([tasks] if isinstance(tasks, str) else tasks) for t in str(task).split(",")]
    names = [t for t in names if t]
    if not names:
        raise ValueError("--tasks: no task given")
    resolved, missing = [], []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            found = [load_yaml(f, resolve_func=True) for f in sorted(glob.glob(os.path.abspath(name)))]
        elif os.path.isdir(name) and not task_manager.match_tasks([name]):
            found = [load_yaml(f, resolve_func=True) for f in sorted(glob.glob(os.path.join(name, "*.yaml")))]
        else:
            found = task_manager.match_tasks([name])
        if not found:
            missing.append(name)
        resolved.extend(t for t in found if t not in resolved)
    if missing:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(missing)} (lm-eval's names, a task YAML, or a "
                         "directory of them; local YAMLs by name need --include-path)")
    return resolved


def _output_files(tracker, results, log_samples) -> list[str]:
    """The files ``EvaluationTracker`` just wrote (its own naming rules)."""
    path = Path(tracker.output_path)
    if path.suffix == ".json":
        files = [path.with_name(f"{path.stem}_{tracker.date_id}.json")]
        folder = path.parent
    else:
        folder = path / str(tracker.general_config_tracker.model_name_sanitized)
        files = [folder / f"results_{tracker.date_id}.json"]
    if log_samples:
        files += [folder / f"samples_{task}_{tracker.date_id}.jsonl" for task in results["configs"]]
    return [str(f) for f in files if f.is_file()]


def evaluate(
    model,
    tasks,
    *,
    tokenizer=None,
    batch_size: int | str = 1,
    max_batch_size: int | None = None,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    metadata: dict | None = None,
    include_path=None,
    output_path: str | os.PathLike | None = None,
    log_samples: bool = False,
    gen_kwargs: str | dict | None = None,
    apply_chat_template: bool | str = False,
    bootstrap_iters: int = 100000,
    model_args: dict | str | None = None,
    task_manager=None,
) -> dict:
    """Run lm-eval ``tasks`` on ``model`` and return lm-eval's results dict (``simple_evaluate``'s).

    ``model``: a model directory (a LoLA directory, or any transformers causal LM), loaded by lm-eval's ``HFLM`` with
    ``dtype`` (``"auto"``: the config's), on ``device`` (default: cuda if available); or a model instance, with
    ``tokenizer`` then required. ``tasks``: lm-eval task names or globs (``"niah_single_1"``, ``"arc_*"``,
    comma-separated or a list), task YAML files, or a directory of YAMLs; ``include_path`` adds directories of task
    YAMLs to the index. ``metadata`` goes to the tasks (RULER: ``{"max_seq_lengths": [4096], "tokenizer": ...}``),
    after the model's own arguments. ``batch_size`` (or ``"auto"``), ``max_batch_size``, ``max_length`` (default:
    lm-eval's rule, the config's ``max_position_embeddings``), ``limit`` (examples per task; < 1: a fraction),
    ``num_fewshot``, ``gen_kwargs``, ``apply_chat_template``, ``bootstrap_iters`` are lm-eval's; ``model_args`` are
    further ``HFLM`` arguments (e.g. ``{"add_bos_token": True}``, or lm-eval's string ``"add_bos_token=True"``).

    ``output_path``: where lm-eval's ``EvaluationTracker`` writes the results JSON (and, with ``log_samples``, each
    task's samples JSONL); the paths written are returned in ``results["output_files"]``. With ``log_samples`` the
    per-example records are also in ``results["samples"]``. ``task_manager``: a ``lm_eval.tasks.TaskManager`` to
    reuse (its index reads every task YAML lm-eval ships, seconds per build); it carries its own ``include_path`` and
    ``metadata``, so those two must then be left out.

    Bad input (a missing directory, an unknown task, lm-eval not installed) raises ``ValueError`` before any model
    is loaded.
    """
    from_dir = isinstance(model, (str, os.PathLike))
    if from_dir:
        model = _check_model_dir(model)
    elif tokenizer is None:
        raise ValueError("a model instance needs its tokenizer (tokenizer=...)")
    if task_manager is not None and (metadata is not None or include_path is not None):
        raise ValueError("a TaskManager carries its own metadata and include_path: pass them when building it")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"--metadata must be a JSON object, got {metadata!r}")
    _require_lm_eval()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import fla_lola  # noqa: F401  (registers model_type "lola" with AutoConfig / AutoModelForCausalLM)

    hf_args = {"pretrained": model if from_dir else type(model).__name__, "backend": "causal"}
    if isinstance(tokenizer, (str, os.PathLike)):
        hf_args["tokenizer"] = os.fspath(tokenizer)
    if from_dir:
        hf_args["dtype"] = dtype
    if max_length is not None:
        hf_args["max_length"] = max_length
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    hf_args.update(model_args or {})
    if task_manager is None:
        if include_path is not None:
            paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
            for p in paths:
                if not os.path.isdir(p):
                    raise ValueError(f"--include-path {os.fspath(p)!r} is not a directory")
            include_path = [os.fspath(p) for p in paths]
        # as lm_eval's command line does: the model's arguments, then --metadata, reach every task
        task_metadata = {k: v for k, v in hf_args.items() if k != "backend" and (from_dir or k != "pretrained")}
        if not from_dir and getattr(tokenizer, "name_or_path", None):
            task_metadata["tokenizer"] = tokenizer.name_or_path
        task_manager = TaskManager(include_path=include_path, metadata=task_metadata | (metadata or {}))
    task_list = resolve_tasks(tasks, task_manager)

    lm_kwargs = dict(hf_args, batch_size=batch_size, max_batch_size=max_batch_size or 64, device=device)
    if not from_dir:
        lm_kwargs.update(pretrained=model, tokenizer=tokenizer)
        lm_kwargs.pop("dtype", None)
    lm = HFLM(**lm_kwargs)
    tracker = EvaluationTracker(output_path=os.fspath(output_path)) if output_path is not None else None
    results = lm_eval.simple_evaluate(
        model=lm, model_args=hf_args, tasks=task_list, num_fewshot=num_fewshot, batch_size=batch_size,
        max_batch_size=max_batch_size, device=device, limit=limit, log_samples=log_samples,
        evaluation_tracker=tracker, gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template,
        bootstrap_iters=bootstrap_iters, task_manager=task_manager)
    if results is None:  # not the main process of a distributed run: lm-eval returns nothing there
        return {}
    if tracker is not None:
        samples = results.pop("samples", None) if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        if log_samples:
            for task in results["configs"]:  # lm-eval turns each record's values into strings as it writes: copies
                tracker.save_results_samples(task_name=task, samples=[dict(s) for s in samples[task]])
            results["samples"] = samples
        results["output_files"] = _output_files(tracker, results, log_samples)
    return results


def _table_headers_adapter() -> None:
    """lm-eval's ``make_table`` names the columns through pytablewriter's ``headers`` (0.39 and later). With our lock
    pip resolves pytablewriter 0.38.0, the newest whose dependencies allow python-dateutil 4 (later ones need
    ``typepy[datetime]``, hence python-dateutil < 3), where the attribute is ``header_list`` and ``headers`` is
    ignored: the table prints with columns named A, B, C, ... Give such a pytablewriter the newer name."""
    try:
        from pytablewriter.writer._table_writer import AbstractTableWriter
    except ImportError:
        return
    if not hasattr(AbstractTableWriter, "headers") and hasattr(AbstractTableWriter, "header_list"):
        AbstractTableWriter.headers = AbstractTableWriter.header_list


def format_results(results: dict) -> str:
    """lm-eval's per-task table (and its groups table, where the tasks form groups)."""
    from lm_eval.utils import make_table

    _table_headers_adapter()
    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


__all__ = ["evaluate", "format_results", "resolve_tasks"]
