"""AI accountability: model results as rows (:mod:`.records`), compared with what the
radiologist reported (:mod:`.concordance`), and summarised (:mod:`.stats`).  Pure
functions over :class:`~gateway.store.findings.ModelRun`; the rows live in the queue
database (:mod:`gateway.store.findings`)."""
