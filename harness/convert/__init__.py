"""``python -m harness.convert``: weights between RWKV-LM ``.pth``, FLA / Hugging Face directories and harness
checkpoints, through RWKV-LM's names (:mod:`~harness.convert.convert`)."""
