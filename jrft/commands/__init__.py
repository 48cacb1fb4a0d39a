"""The ``jrft`` sub-commands, one module each (see ``jrft.cli.COMMANDS``)."""
