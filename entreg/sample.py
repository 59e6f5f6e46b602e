"""``python -m entreg.sample``: the same as ``entreg-sample``."""

from entreg.cli import sample_main as main

if __name__ == "__main__":
    main()
