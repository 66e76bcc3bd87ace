"""The phase clock sums the wall time of each named phase, also when a phase raises."""

import time

import pytest

from ace_diffusers.fitting.clock import PhaseClock


def test_phases_are_summed_in_first_run_order():
    clock = PhaseClock()
    for _ in range(2):
        with clock("b"):
            time.sleep(0.01)
    with clock("a"):
        pass
    with pytest.raises(RuntimeError), clock("c"):
        raise RuntimeError("boom")
    assert list(clock.seconds) == ["b", "a", "c"]
    assert clock.seconds["b"] >= 0.02 and clock.seconds["a"] < clock.seconds["b"]
