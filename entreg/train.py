"""``python -m entreg.train``: the same as ``entreg-train``."""

from entreg.cli import train_main as main

if __name__ == "__main__":
    main()
