"""``python -m recaption`` (and ``torchrun -m recaption``) is the ``recaption`` command."""

from recaption.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
