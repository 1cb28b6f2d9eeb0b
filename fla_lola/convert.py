"""Moved to :mod:`fla_lola.pipeline.convert`; ``fla_lola.convert`` stays an alias of that module."""

import sys

from fla_lola.pipeline import convert

sys.modules[__name__] = convert
