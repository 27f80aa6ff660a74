"""Background services that the running gateway starts beside its pipeline: retention
(:mod:`gateway.services.retention`) and certificate expiry (:mod:`gateway.services.certwatch`).

This layer sits beside :mod:`gateway.pipeline`: it may use the store, security,
observability, the config, the errors and the envelope; never ingest, route, infer,
results or deliver, nor the app or the CLI.
"""
