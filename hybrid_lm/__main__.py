from hybrid_lm.cli import main

raise SystemExit(main())
