"""bench/hotadd.py reads a hot-add's times on the guest's own clock from its serial log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import hotadd

# As Debian 12's 6.1 kernel wrote them on a lab guest's serial console (a shell prompt can
# precede a kernel line; systemd's lines come in between).
SERIAL = (
    "[   11.239013] CPU1 has been hot-added\n"
    "[\x1b[0;32m  OK  \x1b[0m] Started systemd-logind.service - User Login Management.\n"
    "[   11.272652] SMP alternatives: switching to SMP code\n"
    "[   11.398934] x86: Booting SMP configuration:\n"
    "[   11.399202] smpboot: Booting Node 0 Processor 1 APIC 0x1\n"
    "[   11.501479] Will online and init hotplugged CPU: 1\n"
    "\x1b[?2004hroot@vhplab-guest:~# [   12.558903] CPU2 has been hot-added\n"
    "[   12.606842] smpboot: Booting Node 0 Processor 2 APIC 0x2\n"
    "[   12.699485] Will online and init hotplugged CPU: 2\n"
)


def test_hot_added_to_booting_and_up_on_the_guest_clock() -> None:
    first = hotadd.guest_clock(SERIAL, 1)
    assert (first.hotadded, first.booting, first.up) == (11.239013, 11.399202, 11.501479)
    second = hotadd.guest_clock(SERIAL, 2)
    assert second.booting is not None and second.hotadded is not None
    assert second.booting - second.hotadded == pytest.approx(0.047939)


def test_a_cpu_number_is_not_a_prefix_of_another() -> None:
    text = SERIAL.replace("CPU1 has", "CPU12 has").replace("Processor 1 ", "Processor 12 ")
    assert hotadd.guest_clock(text, 1).hotadded is None


def test_booting_only_after_the_hot_add_counts() -> None:
    text = "[    3.000000] smpboot: Booting Node 0 Processor 3 APIC 0x3\n" + (
        "[    9.000000] CPU3 has been hot-added\n"
    )
    found = hotadd.guest_clock(text, 3)
    assert found.hotadded == 9.0 and found.booting is None and found.up is None
