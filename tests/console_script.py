"""The `nai-fast` console script of the Python running the tests."""

import sys
from pathlib import Path


def console_script() -> str:
    """`nai-fast` from this interpreter's own bin folder: the script its install wrote, never a
    version manager's shim or another environment's copy found first on PATH."""
    script = Path(sys.executable).with_name("nai-fast")
    assert script.is_file(), f"the nai-fast console script is not installed beside {sys.executable}"
    return str(script)
