"""`python -m atm_cli`: the same as the `atm` command."""
from atm_cli.cli.app import main

main()
