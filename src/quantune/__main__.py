import sys

from quantune.cli import main

sys.exit(main())
