"""nai_fast.engine.stop: the first SIGINT/SIGTERM is recorded, a second one aborts, handlers come back."""

import os
import signal
import threading

import pytest

from nai_fast.engine.stop import Aborted, StopRequest, exit_code


def deliver(number: int) -> None:
    """Send ``number`` to this process; its Python handler runs before the next line does."""
    os.kill(os.getpid(), number)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_is_recorded_and_the_second_aborts(number, caplog):
    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Aborted) as aborted:
        with StopRequest() as stop:
            assert stop.received is None and stop.flags() == [0.0, 0.0]
            deliver(number)
            assert stop.received == number  # recorded, not raised
            assert "finishing this step" in caplog.text
            deliver(signal.SIGINT)
            pytest.fail("the second signal did not abort")
    assert aborted.value.signal == signal.SIGINT and aborted.value.exit_code == 130
    assert isinstance(aborted.value, KeyboardInterrupt)  # cleanup written for Ctrl-C runs
    assert {n: signal.getsignal(n) for n in before} == before


def test_flags_summed_over_ranks_give_every_rank_the_same_answer():
    here, elsewhere = StopRequest(), StopRequest()
    elsewhere.received = signal.SIGTERM
    summed = [a + b for a, b in zip(here.flags(), elsewhere.flags())]
    assert here.agreed(summed) == elsewhere.agreed(summed) == signal.SIGTERM
    assert here.agreed(here.flags()) is None
    assert exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGTERM) == 143


def test_outside_the_main_thread_it_leaves_signals_alone():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def enter():
        with StopRequest():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before]
