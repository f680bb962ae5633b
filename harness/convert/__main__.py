import sys

from harness.convert.convert import main

sys.exit(main())
