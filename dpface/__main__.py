import sys

from dpface.cli import main

sys.exit(main())
