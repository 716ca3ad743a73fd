"""An empty stand-in for `torchaudio`, installed only into LLaMA-Factory's venv (`make llamafactory`).

Why: LLaMA-Factory 0.9.5 imports torchaudio at the top of `llamafactory/data/mm_plugin.py`, so its
whole training import chain needs the module, but torchaudio has no build for torch 2.13 (the torch
this project pins). LF calls torchaudio only to load and resample audio files for multimodal
datasets; its text-only SFT (what this project trains) never does. So this module only lets the
`import` succeed; any use of it raises and says why. It is a bare folder copied into site-packages (no
dist-info: pip does not list it, and `pip uninstall` does not remove it; `rm -r .venv-lf` does). transformers'
`is_torchaudio_available()` looks only for the module, so it answers True there: only audio models' feature
extractors would then reach for it, and fail with the sentence below.
"""

__all__: list[str] = []


def __getattr__(name):
    raise AttributeError(
        f"torchaudio.{name}: this is conch's empty torchaudio stand-in (tools/torchaudio_standin), installed so "
        "that LLaMA-Factory 0.9.5 imports without a torchaudio build for torch 2.13; audio datasets need the real one")
