"""The Magic Conch (神奇海螺) tutorial package: one module a stage.

hub (resolve/download the base model) -> data (render + mask records) -> train (LoRA SFT)
-> chat / evaluate -> merge -> serve.
"""

__version__ = "0.1.0"
