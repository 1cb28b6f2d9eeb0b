"""Triton kernels of LoLA (inference only): chunked prefill and a single-token decode step.

``triton_lola_attention`` is what ``fla_lola.lola_attention(..., backend="triton")`` calls. On CPU the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), with the small compatibility layer of
:mod:`fla_lola.kernels.interpret` installed on import; on a GPU that layer is never applied.
"""

# From a checkout's root, this folder is also importable as a top-level ``kernels``, a name transformers probes for
# the Hub's `kernels` package: only the installed name ``fla_lola.kernels`` loads the Triton code.
if __name__ == 'fla_lola.kernels':
    from fla_lola.kernels import interpret

    interpret.apply()  # patches Triton only when TRITON_INTERPRET=1

    from fla_lola.kernels.chunk import chunk_lola_fwd
    from fla_lola.kernels.decode import decode_lola_fwd
    from fla_lola.kernels.lola import triton_lola_attention

    __all__ = ['triton_lola_attention', 'chunk_lola_fwd', 'decode_lola_fwd']
