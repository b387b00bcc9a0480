"""`python -m runledger_server` is the `runledger` command."""

import sys

from runledger_server.cli import main

sys.exit(main())
