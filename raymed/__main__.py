from raymed.cli import main

raise SystemExit(main())
