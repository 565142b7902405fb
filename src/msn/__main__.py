import sys

from msn.cli import main

sys.exit(main())
