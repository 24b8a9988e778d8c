"""`python -m cipherpool` is the same program as the `cipherpool` script."""

from cipherpool.cli import main

main()
