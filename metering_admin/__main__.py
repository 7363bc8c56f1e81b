import sys

from metering_server.admin_cli import main

sys.exit(main())
