"""``python -m layercard_client.cli``: the ``layercard`` command without the console script on PATH."""

import sys

from layercard_client.cli import main

sys.exit(main())
