"""ESM (Essential Subspace Merging) for decoder LLMs (Llama, Mistral, Qwen, Gemma, Phi-3, …), as a mergekit merge method.

Importing this package is cheap on purpose (no torch, no mergekit): the ``.pth`` file
installed next to it imports :mod:`mergekit_esm._import_hook` at every interpreter start.
"""

__version__ = "0.1.0"
