"""SIGTERM and Ctrl-C stop a run only after it saved: they are noted, the loop saves at its next
optimizer step and stops (common.stop_if_signalled).

Tests (in tests/, unless named otherwise):
- test_every_script.py::test_a_stop_signal_saves_and_the_rerun_continues_from_that_step
- test_every_script.py::test_a_run_called_in_process_gives_the_signals_back"""

import signal


class StopSignals:
    """SIGTERM (a scheduler's preemption, Colab's stop button) and SIGINT (Ctrl-C) are only
    noted: the run saves at its next optimizer step, then exits; a second one acts at once. run()
    gives back what the signals did before."""

    received = None
    previous = {}

    @classmethod
    def catch(cls):
        cls.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            cls.previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, cls.note)

    @classmethod
    def note(cls, signum, frame):
        cls.received = signum
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    @classmethod
    def restore(cls):
        while cls.previous:
            sig, handler = cls.previous.popitem()
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
