"""``python -m hybridkv.sim``: see :mod:`hybridkv.sim.cli`."""

from hybridkv.sim.cli import main

raise SystemExit(main())
