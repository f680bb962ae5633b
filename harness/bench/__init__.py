"""The benchmarks, one module each behind one CLI (:mod:`harness.bench.cli`, ``python -m harness.bench``):

* :mod:`~harness.bench.step`: the bare training step (fwd + bwd + AdamW), like nanoGPT's bench.py;
* :mod:`~harness.bench.wkv_op`: the WKV op alone, time and accuracy vs fp64 (tables in ``wkv_op_report``);
* :mod:`~harness.bench.decoding`: decoding latency and memory vs context (figures in ``decoding_report``);
* :mod:`~harness.bench.parity`: two implementations layer by layer against the fp64 reference.

:mod:`~harness.bench.grid` holds what the grids share (guarded cells, skip statuses, resume, CSV cells).
"""
