"""The Magic Conch (神奇海螺) tutorial package: one module a stage.

hub (resolve/download the base model) -> data (render + mask records) -> train (LoRA SFT)
-> chat / evaluate -> merge -> serve.
"""

__version__ = "0.1.0"

import warnings as _warnings

# peft asks transformers for `is_gradient_checkpointing`, which transformers 5 renamed: a warning
# about library internals that a learner can do nothing about
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
