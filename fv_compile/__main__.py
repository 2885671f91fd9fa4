"""`python -m fv_compile report ...`, the same as the `fv-compile` command."""

from fv_compile.cli import main

raise SystemExit(main())
