"""`python -m int8`: the `int8` command."""

from .cli import main

if __name__ == "__main__":
    main()
