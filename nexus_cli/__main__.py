from nexus_cli.cli import run

run()
