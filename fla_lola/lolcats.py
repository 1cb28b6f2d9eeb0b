"""Moved to :mod:`fla_lola.pipeline.lolcats`; ``fla_lola.lolcats`` stays an alias of that module."""

import sys

from fla_lola.pipeline import lolcats

sys.modules[__name__] = lolcats
