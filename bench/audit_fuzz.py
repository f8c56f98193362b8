"""Long run of the grant/MMU stateful fuzzer with the frame-table auditor after every step.

    .venv/bin/python bench/audit_fuzz.py [examples] [steps]

Prints examples/steps run and the time; exits non-zero with hypothesis' minimal failing
sequence if the auditor finds a discrepancy or a frame leaks.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiovmm.fuzz_grants import GrantMachine  # noqa: E402


def main() -> None:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 80
    logging.basicConfig(level=logging.CRITICAL)     # crashes of fuzzed domains are expected
    GrantMachine.kernel = str(ROOT / "guests" / "build" / "kernel.elf")
    t0 = time.perf_counter()
    run_state_machine_as_test(GrantMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck)))
    for k, n in sorted(GrantMachine.stats.items()):
        print(f"  {k}: {n}")
    print(f"examples={examples} steps_per_example={steps} seconds={time.perf_counter() - t0:.1f} ok")


if __name__ == "__main__":
    main()
