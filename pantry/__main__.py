import sys

from pantry.cli.main import main

sys.exit(main())
