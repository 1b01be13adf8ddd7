"""Settings every property test shares (tests/ and integration/ alike).

On CI (``CI=true``) the examples derive from each test's source and no example database is
used, so a red CI run is reproducible; locally each run explores new examples and replays
earlier failures from .hypothesis/ (gitignored). No per-example deadline: a loaded machine is
slow, not wrong.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("sdnsup", deadline=None, print_blob=True)
settings.register_profile(
    "sdnsup-ci", parent=settings.get_profile("sdnsup"), derandomize=True, database=None
)
settings.load_profile(
    "sdnsup-ci" if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") else "sdnsup"
)
