"""An acceptor reactor that wakes when a DIMSE message arrives, instead of every millisecond.

pynetdicom's acceptor (``Association._run_reactor``) sleeps 1 ms, then looks for a decoded
DIMSE message, in a loop: every C-STORE waits half a millisecond on average before its
handler runs, and every idle association wakes a thousand times a second (with four
associations, those wake-ups compete for the GIL with the handlers).  pynetdicom has no
setting for it.  :func:`install` replaces the loop of one association with the same loop
built on a blocking ``Queue.get``: the message is served as soon as the DUL thread has
decoded it; the other checks (release, abort, DUL alive, network timeout) run at least
every :data:`CHECK_SECONDS`.

This is a copy of pynetdicom 3.0's loop with one change, so it is only installed on the
pynetdicom major version it was written against (:data:`SUPPORTED`); on any other the
association keeps pynetdicom's own.  The acceptor never pauses its reactor to send on the
same association (the gateway's SCP only answers), which is what the original's
``_reactor_checkpoint`` is for; it is honoured all the same.

Imports only pynetdicom and the standard library.
"""

from __future__ import annotations

import queue
import types
from typing import Any

import pynetdicom
from pynetdicom import evt

__all__ = ["CHECK_SECONDS", "SUPPORTED", "install"]

CHECK_SECONDS = 0.005  # the longest an idle association waits between its other checks
SUPPORTED = pynetdicom.__version__.split(".")[0] == "3"


def install(assoc: Any) -> bool:
    """Make *assoc* (an acceptor not yet established) use :func:`_run_reactor`; return
    whether it was installed."""
    if not SUPPORTED:
        return False
    assoc._run_reactor = types.MethodType(_run_reactor, assoc)
    return True


def _run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``Association._run_reactor``, waiting on the DIMSE message queue
    (with :data:`CHECK_SECONDS` as the timeout) instead of ``time.sleep(0.001)``."""
    messages = self.dimse.msg_queue
    self._is_paused = False
    while not self._kill:
        # Will block until `_reactor_checkpoint` is set() (see the module docstring)
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = messages.get(timeout=CHECK_SECONDS)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)
            continue  # the next message may be waiting already

        # Check for release request from the peer
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        # Check for abort from either locally or the peer
        if self.acse.is_aborted():
            # Ensure that EVT_ACSE_RECV fires for subscribers
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        # Check if the DULServiceProvider thread is still running
        if not self.dul.is_alive():
            self.kill()
            return

        # Check if network_timeout has expired
        if self.dul.idle_timer_expired():
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return
