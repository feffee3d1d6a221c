import sys

from qpsa.cli import main

sys.exit(main())
