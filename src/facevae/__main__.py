"""`python -m facevae`: the same as the `facevae` command."""

from facevae.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
