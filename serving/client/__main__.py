"""`python -m serving.client`: the CLI (serving/client/cli.py)."""

import sys

from serving.client.cli import main

sys.exit(main())
