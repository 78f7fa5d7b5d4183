import sys

from x2vlm.cli import main

sys.exit(main())
