from joynode.cli import main

raise SystemExit(main())
