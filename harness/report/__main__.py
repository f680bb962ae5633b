import sys

from harness.report.cli import main

main(sys.argv[1:])
