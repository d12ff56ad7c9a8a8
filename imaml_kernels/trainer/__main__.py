"""``python -m imaml_kernels.trainer ...`` is ``imaml-train ...`` (also under ``torchrun -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
