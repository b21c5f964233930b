"""``python -m cnntrain`` behaves exactly like the ``cnntrain`` console script."""

from cnntrain.cli import main

if __name__ == "__main__":
    main()
