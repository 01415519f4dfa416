"""`python -m src.eval ...` is the same command as `python -m src.evaluate ...`."""

from ..evaluate import main

if __name__ == "__main__":
    main()
