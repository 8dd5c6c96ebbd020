import sys

from relp.cli import main

sys.exit(main())
