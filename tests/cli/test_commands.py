"""The command table of the lazily loaded CLI matches what the modules define."""
import importlib

import click

from layerfs import cli as cli_pkg


def test_every_listed_command_loads():
    ctx = click.Context(cli_pkg.cli)
    for name, module in cli_pkg.COMMANDS.items():
        cmd = cli_pkg.cli.get_command(ctx, name)
        assert cmd is not None, name
        assert cmd.callback.__module__ == f"layerfs.cli.{module}", name


def test_no_command_is_missing_from_the_table():
    for module in set(cli_pkg.COMMANDS.values()):
        importlib.import_module(f"layerfs.cli.{module}")
    assert set(cli_pkg.cli.commands) <= set(cli_pkg.COMMANDS)


def test_unknown_command_is_an_error_with_exit_2():
    assert cli_pkg.main(["no-such-verb"]) == 2
