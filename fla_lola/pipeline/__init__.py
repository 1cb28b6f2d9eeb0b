"""What researchers run on top of the library core (``fla_lola.ops``, ``layers``, ``models``, ``kernels``,
``registry``): the core never imports from here.

- :mod:`~fla_lola.pipeline.convert`: a transformers softmax model → :class:`~fla_lola.LoLAForCausalLM`, in memory;
- :mod:`~fla_lola.pipeline.checkpoint`: the same between checkpoint directories, streaming, with LoLCATs files;
- :mod:`~fla_lola.pipeline.lolcats`: LoLCATs stage-1 / stage-2 checkpoints in and out;
- :mod:`~fla_lola.pipeline.distill`: attention transfer (LoLCATs stage 1), under ``accelerate launch`` too;
- :mod:`~fla_lola.pipeline.data`: training text, tokenized and cut into rows;
- :mod:`~fla_lola.pipeline.prefill`: chunked prefill of long prompts;
- :mod:`~fla_lola.pipeline.passkey`: the pass-key demo's tasks, tokenizer, teacher and training;
- :mod:`~fla_lola.pipeline.ruler`: RULER-style pass-key retrieval of any causal LM with its own tokenizer.

The ``fla-lola`` command (:mod:`fla_lola.cli`) runs them.
"""
