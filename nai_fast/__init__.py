"""nai_fast: NovelAI Diffusion's improvements to Stable Diffusion 1.x, fast.

The package root stays light: submodules are imported where they are used
(``nai_fast.buckets`` needs only NumPy), and nothing here pulls in torch,
diffusers or transformers.
"""

__version__ = "0.1.0"
