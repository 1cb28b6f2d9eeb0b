"""Triton kernels of LoLA (inference only): chunked prefill and a single-token decode step.

``triton_lola_attention`` is what ``fla_lola.lola_attention(..., backend="triton")`` calls. On CPU the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), with the small compatibility layer of
:mod:`fla_lola.kernels.interpret` installed on import; on a GPU that layer is never applied.

This folder installs as ``fla_lola.kernels``. From a checkout's root (``python -c``, ``python -m``, ``python -m
pytest`` put the current directory first on ``sys.path``) it is also found as a top-level ``kernels``, the name of the
Hugging Face Hub's kernels package, which transformers >= 5.25 imports. Imported under that name, this file steps
aside: it loads the ``kernels`` that ``sys.path`` holds without the checkout's root in its place; where there is none,
the name stays an empty module with version ``0``, which transformers reads as "not installed".
"""

if __name__ == 'fla_lola.kernels':
    from fla_lola.kernels import interpret

    interpret.apply()  # patches Triton only when TRITON_INTERPRET=1

    from fla_lola.kernels.chunk import chunk_lola_fwd
    from fla_lola.kernels.decode import decode_lola_fwd
    from fla_lola.kernels.lola import triton_lola_attention

    __all__ = ['triton_lola_attention', 'chunk_lola_fwd', 'decode_lola_fwd']
else:
    def _step_aside(name: str) -> bool:
        """Put in ``sys.modules[name]`` the module of that name found on ``sys.path`` without this checkout's root;
        ``False`` where there is none."""
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
        path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds once this file has run
        spec.loader.exec_module(module)
        return True

    if not _step_aside(__name__):
        # No Hub package: transformers finds this folder, imports it and reads its version (5.6-5.24 parse it, and
        # fail on none); a version below any minimum makes every release read "not installed".
        __version__ = '0'
    del _step_aside
