"""`python -m sealtorch` is the `sealtorch` command."""

from sealtorch.cli import main

main()
