"""``python -m tokengate``: the same as the ``tokengate`` console script."""

from tokengate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
