"""``python -m loadtest.vs_dynamo``: see ``loadtest.vs_dynamo.cli``."""

from loadtest.vs_dynamo.cli import main

raise SystemExit(main())
