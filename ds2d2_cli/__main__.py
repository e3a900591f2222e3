"""`python -m ds2d2_cli` runs the CLI (and is what `torchrun -m ds2d2_cli` starts)."""

from ds2d2_cli.cli.app import main

if __name__ == "__main__":
    main()
