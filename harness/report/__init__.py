"""``python -m harness.report``: results/ -> figures/ and results/summary.md (stages: :mod:`~harness.report.cli`)."""
