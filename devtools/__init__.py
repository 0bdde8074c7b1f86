"""Dev tooling: what runs Motorcade on a developer's machine and in the test suite (local
servers, the `make dev` stack, the simulated fleet, the generated documents), never a role
of a deployment. `core/` holds the runtime plumbing; `core/cli.py` reaches this package only
from inside the subcommands that need it."""
