"""The bounded budget of the fuzz property tests in CI (the long runs are `scripts/fuzz.py`).

Derandomized, so CI draws the same inputs every run and a red build is reproducible; no
example database; a per-example deadline far above any honest input's time (microseconds),
so only a hang or a blow-up trips it, even on a loaded machine. `FUZZ_EXAMPLES` is sized so
every `test_fuzz_*` test together stays under a minute on a shared 2-core machine.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES: Final = 40

ci_fuzz: Final = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
