"""Monitoring: query times per model and worker (:mod:`.timings`), queue depths (:mod:`.depth`),
the figures providers read (:mod:`.stats`) and the gateway's Prometheus metrics."""
