"""`python -m sala_sglang`: the `sala-sglang` command line."""

from sala_sglang.cli import main

raise SystemExit(main())
