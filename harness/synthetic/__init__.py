"""The training side of "Deconstructing RWKV, Part 3" (RWKV vs Transformer vs LSTM at about 50K parameters on a
synthetic next-token task) as a harness experiment: ``python -m harness.synthetic [key=value ...]``.

:mod:`~harness.synthetic.task` generates the data, :mod:`~harness.synthetic.models` builds the three parameter-matched
models, :mod:`~harness.synthetic.train` trains them and appends one row per epoch to ``<out>/epochs.csv``, and
:mod:`~harness.synthetic.report` turns that CSV (and the decoding benchmark's rows at the same model size) into the
comparison with the article's numbers."""
