"""A user's own test with the aiovmm pytest plugin (installed with aiovmm: no conftest).

    pip install aiovmm pytest pytest-asyncio
    pytest -q examples/test_example.py

Boots the project's guest kernel (guests/build/kernel.elf; `make -C guests`) and checks
what it prints and how it ends.
"""
import os

import pytest

KERNEL = os.path.join(os.path.dirname(__file__), "..", "guests", "build", "kernel.elf")


@pytest.mark.asyncio
async def test_guest_ticks(aiovmm_hypervisor):
    dom = await aiovmm_hypervisor.create(KERNEL, memory_mib=8, cmdline="ticks=3")
    await dom.wait_for_line(r"^timer: 3 ticks in \d+ ns$", 30)
    assert (await dom.wait()).name == "poweroff"
