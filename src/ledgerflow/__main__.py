"""``python -m ledgerflow``: the ``ledgerflow`` command, where the script is not on PATH."""

from .cli import main

main()
