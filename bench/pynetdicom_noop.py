"""A bare pynetdicom storage SCP that acknowledges without storing anything: the floor
that any pynetdicom-based receiver (the gateway included) starts from.

    python -m bench.pynetdicom_noop PORT AE_TITLE

Same settings as the gateway's SCP where they matter for speed: every storage SOP class
and transfer syntax, unlimited PDU size, the same DUL poll delay, no pynetdicom logging.
"""

from __future__ import annotations

import sys
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt

from gateway.dicom.network import DUL_POLL_SECONDS


def main() -> None:
    port, ae_title = int(sys.argv[1]), sys.argv[2]
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for cx in StoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)

    def on_open(event: Any) -> None:
        event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS

    def on_store(event: Any) -> int:
        event.encoded_dataset()  # take the bytes, as any receiver must; store nothing
        return 0x0000

    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
