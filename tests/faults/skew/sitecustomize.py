"""Test-only: a Python process whose wall clock is off by ``FAULTS_CLOCK_SKEW`` seconds.

Put this directory on PYTHONPATH of a worker to simulate a host with a skewed clock (the system
clock itself cannot be changed in a shared test machine): ``time.time()`` and Django's
``timezone.now()`` are shifted; monotonic clocks are not (they never follow the wall clock).
"""

import os
import time

_skew = float(os.environ.get("FAULTS_CLOCK_SKEW", "0") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
    from datetime import timedelta

    import django.utils.timezone as _tz

    _now = _tz.now
    _tz.now = lambda: _now() + timedelta(seconds=_skew)
