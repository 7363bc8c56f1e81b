import sys

from metering_server.cli import main

sys.exit(main())
