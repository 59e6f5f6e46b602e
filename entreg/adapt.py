"""``python -m entreg.adapt``: the same as ``entreg-adapt``."""

from entreg.cli import adapt_main as main

if __name__ == "__main__":
    main()
