from memlend.cli import main

raise SystemExit(main())
