import sys

from coordinator.launch.cli import main

sys.exit(main())
