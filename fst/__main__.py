import sys

from fst.cli import main

sys.exit(main())
