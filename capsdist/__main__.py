from capsdist.cli import main

raise SystemExit(main())
