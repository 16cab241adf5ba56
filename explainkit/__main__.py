"""``python -m explainkit`` (and ``torchrun -m explainkit``) runs the CLI."""

from explainkit.cli import main

if __name__ == "__main__":
    main()
