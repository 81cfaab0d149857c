"""`python -m app ...`: the kit's single entrypoint."""

from app.cli import main

if __name__ == "__main__":
    main()
