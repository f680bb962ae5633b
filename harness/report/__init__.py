"""``python -m harness.report``: results/ -> figures/ and results/summary.md (:mod:`~harness.report.summary`)."""
