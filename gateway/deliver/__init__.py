"""The edges out: C-STORE to DICOM destinations, MLLP to HL7 destinations, and the retry
policy that paces both.

This package file holds only what the senders share: the :class:`Outcome` of one delivery
attempt and the two exceptions a sender raises.  The senders live in their own modules
(:mod:`gateway.deliver.dicom_scu`, :mod:`gateway.deliver.hl7_client`) so that importing
one does not import the other's protocol library.
"""

from __future__ import annotations

import enum

from gateway.errors import Permanent, Transient

__all__ = ["DeliveryRefused", "DeliveryRetry", "Outcome"]


class Outcome(enum.Enum):
    """What one delivery attempt achieved, read from the peer's own answer."""

    DELIVERED = "delivered"
    """The peer confirmed (DICOM success or warning status, HL7 AA/CA)."""
    TRANSIENT = "transient"
    """Not delivered; the same request can succeed later (retry per the policy)."""
    PERMANENT = "permanent"
    """Not delivered; retrying cannot help (dead letter)."""


class DeliveryRetry(Transient):
    """The destination did not confirm the delivery; try again later."""


class DeliveryRefused(Permanent):
    """The destination refused the delivery; retrying cannot help."""
