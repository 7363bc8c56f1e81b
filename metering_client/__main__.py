import sys

from metering_client.cli import main

sys.exit(main())
