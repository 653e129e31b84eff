"""One module per ``ipv2-denoise`` subcommand; see :mod:`IPv2DenoiseLib.app.cli`."""
