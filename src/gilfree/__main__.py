"""`python -m gilfree <command>`: the command-line tools."""
import sys

USAGE = """usage: python -m gilfree <command> [args...]

commands:
  diagnose   run a program with exact GIL accounting and print a verdict
             (python -m gilfree diagnose [--trace OUT.json] [--svg OUT.svg] [--sample-hz N]
                                         (script.py | -m module) [args...])
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    if not argv:  # a usage error, as argparse has it: usage to stderr, status 2
        print(f"gilfree: give a command\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "diagnose":
        from .diagnose import main as diagnose_main

        return diagnose_main(rest)
    print(f"gilfree: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
