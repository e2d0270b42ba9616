"""`python -m arflow_scale.cli`: the same as the `arflow` command."""
from . import main

raise SystemExit(main())
