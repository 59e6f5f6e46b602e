"""``python -m entreg.finetune``: the same as ``entreg-finetune``."""

from entreg.cli import finetune_main as main

if __name__ == "__main__":
    main()
