"""Moved to :mod:`fla_lola.pipeline.passkey`; ``fla_lola.passkey`` stays an alias of that module."""

import sys

from fla_lola.pipeline import passkey

sys.modules[__name__] = passkey
