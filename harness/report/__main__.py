import sys

from harness.report.summary import main

main(sys.argv[1:])
