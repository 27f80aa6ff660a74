"""Routing: which route a study or message takes (:func:`decide`, pure), and the
attribute builders that feed it (:mod:`gateway.route.attributes`)."""

from gateway.route.rules import CALLING_AE, Attributes, Decision, decide, route_matches

__all__ = ["CALLING_AE", "Attributes", "Decision", "decide", "route_matches"]
