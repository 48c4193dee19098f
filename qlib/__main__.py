from qlib.cli import main

raise SystemExit(main())
