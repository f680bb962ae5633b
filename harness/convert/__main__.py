import sys

from harness.convert.cli import main

sys.exit(main())
