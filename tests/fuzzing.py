"""Hypothesis's profiles for the fuzz tests, loaded by conftest.py. A module of its own, which
imports nothing of aekit or torch, so a fresh process can check what it chooses quickly.

Fuzz budgets: small for `make test`, large for `make test-slow` (HYPOTHESIS_PROFILE=slow).
In CI (CI=true) the small budget is derandomized: the same examples every run, so a red
build means a change broke something, not that hypothesis drew a new example; the large
random budget of `make test-slow` is where new examples are found.
No deadline: a hang is caught by the fuzz tests' own alarm, and timing on a shared
machine says nothing. Fixtures such as tmp_path are reused across examples on purpose.
"""

import os

from hypothesis import HealthCheck, settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
             print_blob=True)
settings.register_profile("default", max_examples=100, derandomize=IN_CI, **_FUZZ)
settings.register_profile("slow", max_examples=5000, derandomize=False, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
