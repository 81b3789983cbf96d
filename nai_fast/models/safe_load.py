"""The safe loader's former home: :mod:`nai_fast.safe_load` holds it now (``text/`` reads
embedding files with it and may not import ``models/``). Kept so existing imports keep working."""

from ..safe_load import error_reason, load_weights_only

__all__ = ["error_reason", "load_weights_only"]
