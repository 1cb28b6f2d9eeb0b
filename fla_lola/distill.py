"""Moved to :mod:`fla_lola.pipeline.distill`; ``fla_lola.distill`` stays an alias of that module."""

import sys

from fla_lola.pipeline import distill

sys.modules[__name__] = distill
