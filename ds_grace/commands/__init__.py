"""Subcommands of `ds-grace`; see ds_grace/cli.py."""
