import sys

from kvstore.cli.parser import main

sys.exit(main())
