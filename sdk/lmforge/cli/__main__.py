"""`python -m lmforge.cli`."""

from lmforge.cli.main import main

main()
