"""`python -m anomalens`: the same command line as the `anomalens` console script."""

from anomalens.cli import main

main()
