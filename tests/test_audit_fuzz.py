"""The stateful grant/MMU fuzzer (aiovmm.fuzz_grants) with the frame-table auditor after every
step, bounded for the suite (bench/audit_fuzz.py runs it longer). It drives two or three
parked domains through the real handlers; findings 2, 3 and 7 of issue 9 are exactly what
the auditor reports when their fixes are reverted (docs/design.md, "Grants")."""
from __future__ import annotations

from hypothesis import HealthCheck, settings

from aiovmm.fuzz_grants import GrantMachine
from conftest import kernel

GrantMachine.kernel = kernel()


class TestGrantMachine(GrantMachine.TestCase):
    settings = settings(max_examples=20, stateful_step_count=30, deadline=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))
