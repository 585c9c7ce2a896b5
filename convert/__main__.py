"""`python -m hyla.convert` / `torchrun -m hyla.convert`: run `hyla convert` in this process."""

from hyla.convert.cli import main

main()
