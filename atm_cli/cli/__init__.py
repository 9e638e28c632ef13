"""The `atm` command line: Typer commands that call the library layers and print what they return."""
