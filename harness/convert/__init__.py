"""``python -m harness.convert``: weights between RWKV-LM ``.pth``, FLA / Hugging Face directories and harness
checkpoints, through RWKV-LM's names; a training run's own checkpoints (Lightning files, DeepSpeed directories)
export to all three.

* :mod:`~harness.convert.namings`: canonical (RWKV-LM) name <-> each format's name;
* :mod:`~harness.convert.shapes`: the model dimensions a set of tensors describes, and the tensors it must hold;
* :mod:`~harness.convert.state_dicts`: ``torch.save``'d files as users have them (nested, prefixed, DeepSpeed);
* :mod:`~harness.convert.readers` and :mod:`~harness.convert.writers`: one reader and one writer per format;
* :mod:`~harness.convert.convert`: the conversion plan and ``convert()``; :mod:`~harness.convert.cli`: the CLI.
"""

from harness.errors import HarnessError


class ConvertError(HarnessError):
    """A conversion that cannot be done; the message names the tensor or file."""
