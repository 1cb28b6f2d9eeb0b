"""Moved to :mod:`fla_lola.pipeline.prefill`; ``fla_lola.prefill`` stays an alias of that module."""

import sys

from fla_lola.pipeline import prefill

sys.modules[__name__] = prefill
