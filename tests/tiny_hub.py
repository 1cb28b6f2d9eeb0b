"""Tiny checkpoints in the Hub layout, built offline: the shared corpus, a byte-level BPE tokenizer trained on it, and
the config of a random Llama-3-style teacher (the CLI, evaluation, data and serving tests use them)."""

from __future__ import annotations

import transformers

CORPUS = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "One of the special magic numbers for harbor is: 1234567. What is the special magic number? "
          "0 1 2 3 4 5 6 7 8 9 ") * 4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def build_tokenizer():
    """A byte-level BPE trained offline on a tiny corpus, wrapped as transformers saves real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def tiny_llama3_config(tokenizer, **overrides) -> transformers.LlamaConfig:
    """Llama-3 RoPE, GQA, tied embeddings, hidden 64, 2 layers, with ``tokenizer``'s vocabulary and special tokens."""
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_parameters=dict(LLAMA3), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return transformers.LlamaConfig(**{**fields, **overrides})


def run_cli(*args) -> int:
    """``fla-lola ARGS`` in this process (arguments stringified); the exit status."""
    from fla_lola.cli import main

    return main([str(a) for a in args])
