"""The pytest plugin, under the name ``tokengate.testing.plugin`` for ``-p`` and
``pytest_plugins``: this name is the very module ``_tokengate_pytest`` (the installed entry
point's, kept outside the package so that loading it imports nothing of tokengate)."""

from __future__ import annotations

import sys

import _tokengate_pytest

sys.modules[__name__] = _tokengate_pytest
