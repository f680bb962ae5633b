"""Training data: :mod:`~harness.data.binidx` (binidx files, RWKV-LM's magic-prime sampler, the
``python -m harness.data`` CLI), :mod:`~harness.data.tokenizer` (the RWKV world tokenizer), and the bundled sample
in ``assets/``."""
