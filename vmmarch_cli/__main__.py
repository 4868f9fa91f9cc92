from vmmarch_cli.cli import run

run()
