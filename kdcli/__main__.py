from kdcli.io.files import exit_on_signals

exit_on_signals()  # a signal while the CLI is imported: one line, not a traceback

from kdcli.cli import main  # noqa: E402

main()
