"""`python -m int8.cli`: the same as the `int8` console script."""

from . import main

main()
