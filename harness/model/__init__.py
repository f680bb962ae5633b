"""The model around a pluggable time-mix: :mod:`~harness.model.rwkv` (RWKV-7 with canonical names, L2Wrap loss),
:mod:`~harness.model.init` (RWKV-LM's init and the run's init modes), :mod:`~harness.model.checkpoint` (the
harness's safetensors checkpoint), :mod:`~harness.model.decoding` (one token at a time from a carried state) and
:mod:`~harness.model.baselines` (the parameter-matched Transformer and LSTM)."""
