from bench.report import main

raise SystemExit(main())
