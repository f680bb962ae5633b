"""The one training path (PyTorch Lightning; DeepSpeed ZeRO-2 bf16 on GPUs): :mod:`~harness.training.plan` (the
run validated before anything is written), :mod:`~harness.training.trainer` (build, fit, summarize),
:mod:`~harness.training.strategy` (the Lightning strategy and optimizer), :mod:`~harness.training.callbacks` (lr
schedule, step timing, steps.csv, checkpoints, diagnostics), :mod:`~harness.training.optim` (parameter groups by role
or by name, RWKV-LM's lr schedule), :mod:`~harness.training.memory` (the estimate a run is checked against) and
:mod:`~harness.training.sync_free_clip` (DeepSpeed's clipping without host syncs). ``python -m harness.run`` is its
CLI."""
