"""A stand-in for train.StopRequest whose stop flag turns on at its n-th read: as if Ctrl-C came during step n
(train.py reads the flag once per step, after the step)."""

import train


def stop_after(n: int) -> type:
    class StopAfter(train.StopRequest):
        reads = 0

        @property
        def requested(self):
            StopAfter.reads += 1
            return StopAfter.reads >= n

        @requested.setter
        def requested(self, value):  # StopRequest.__init__ sets it; the reads decide
            pass

    return StopAfter
