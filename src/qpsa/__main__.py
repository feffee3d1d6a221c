import sys

from qpsa.cli.app import main

sys.exit(main())
