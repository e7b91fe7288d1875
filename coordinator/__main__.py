"""`python -m coordinator`: the same as the `coordinator` script."""

from .cli import main

main()
