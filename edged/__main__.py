from edged.cli import entry

entry()
