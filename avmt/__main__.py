"""``python -m avmt`` → :func:`avmt.cli.main`."""

from avmt.cli import main

if __name__ == "__main__":
    main()
