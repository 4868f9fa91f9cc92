from vmmarch_cli.cli import main

main()
